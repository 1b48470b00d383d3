"""Budget policies: how many KV blocks each head of a layer attends to in stage 2.

Three policies (``DSVConfig.budget_policy``):

- ``"theta"`` (the DSV paper's rule): head h keeps k_h = ceil((1 - s_h) n_kv) blocks, s_h its
  profiled block sparsity (the fewest blocks holding ``theta`` of the mass), and a layer runs
  sparse only when its mean sparsity clears ``layer_sparsity_threshold``. On models whose
  sparsity exists per token but not per 64x64 block it leaves most layers dense.
- ``"target"`` (compute target): the layer attends ``target_density`` of its (head, KV block)
  pairs, spread over the heads to hold the most attention mass. Each head's profiled mass
  curve (mean mass its first k blocks hold, in the predictor's ranking, as a function of k)
  says what one more block is worth; taking the best marginal gains over all heads is optimal
  when the curves are concave, and a curve that is not is flattened to its running minimum of
  gains (a lower bound), so each head's share stays a prefix of its ranking.
- ``"uniform"``: every head ``target_density`` of the blocks (VSA's top-k rule), for comparison.

``budget_scope='model'`` spreads the target policy's blocks over the heads of all layers built
from one DSVConfig instead of within each layer (``ModelBudgetPool``).

Under the two target policies, stage 2 anneals the layer's density from the theta rule's density
at the stage switch to ``target_density`` over ``anneal_steps`` steps, along a line (budgets
move every step or two; the selection reads them from the device, device_budgets.py, so CUDA
graphs replay across them), so the model adapts to the sparser attention; in stage 1 (dense) the budgets, which the recall is measured at, are the
theta rule's, where stage 2 begins. ``budget_floor`` / ``budget_ceiling`` bound every head.

The curves live in the stage controller (checkpointed, on a fixed grid of densities so one
curve serves every sequence length); this module only turns state into per-head block counts,
on the host, cached per (state version, n_kv, total blocks): forwards do no work here unless the
budgets change.
"""

from __future__ import annotations

import math
import weakref
from typing import List, Optional, Sequence, Tuple

import torch

# A head's mass curve is kept at densities j / CURVE_POINTS, j = 0..CURVE_POINTS.
CURVE_POINTS = 128


def curve_on_grid(held: torch.Tensor) -> torch.Tensor:
    """held [..., n_kv] (mass of the first k + 1 blocks) -> [..., CURVE_POINTS + 1] at densities
    j / CURVE_POINTS, linear between block counts (mass 0 at density 0)."""
    n_kv = held.shape[-1]
    full = torch.cat([torch.zeros_like(held[..., :1]), held], dim=-1)  # [..., n_kv + 1] by block count
    return _interp(full, torch.linspace(0.0, n_kv, CURVE_POINTS + 1, dtype=torch.float64, device=held.device))


def curve_at_blocks(curve: torch.Tensor, n_kv: int) -> torch.Tensor:
    """curve [..., CURVE_POINTS + 1] on the density grid -> mass held by k = 0..n_kv blocks [..., n_kv + 1]."""
    pos = torch.arange(n_kv + 1, dtype=torch.float64, device=curve.device) * (CURVE_POINTS / n_kv)
    return _interp(curve, pos)


def _interp(values: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """values sampled at 0, 1, ..., n along the last dim, read at fractional positions pos (linear)."""
    lo = pos.floor().long().clamp(max=values.shape[-1] - 1)
    hi = (lo + 1).clamp(max=values.shape[-1] - 1)
    w = (pos - lo).to(values.dtype)
    return values[..., lo] * (1 - w) + values[..., hi] * w


def block_range(n_kv: int, floor: float, ceiling: float) -> Tuple[int, int]:
    """[lo, hi] blocks a head may keep: the floor and ceiling fractions, at least one block."""
    lo = min(n_kv, max(1, math.ceil(floor * n_kv - 1e-9)))
    return lo, min(n_kv, max(lo, math.ceil(ceiling * n_kv - 1e-9)))


def theta_blocks(block_sparsity: Sequence[float], n_kv: int, lo: int, hi: int) -> List[int]:
    """k_h = ceil((1 - s_h) n_kv) clipped to [lo, hi]; a head not profiled yet keeps every block."""
    return [n_kv if math.isnan(s) else min(max(math.ceil((1.0 - s) * n_kv - 1e-9), lo), hi)
            for s in block_sparsity]


def total_blocks(density: float, heads: int, n_kv: int, lo: int, hi: int) -> int:
    """Blocks of the whole layer at `density`, within what the per-head bounds allow."""
    return min(max(round(density * heads * n_kv), heads * lo), heads * hi)


def uniform_blocks(total: int, heads: int, lo: int, hi: int) -> List[int]:
    """`total` blocks split evenly over the heads (the first heads take the remainder)."""
    base, extra = divmod(total, heads)
    return [min(max(base + (h < extra), lo), hi) for h in range(heads)]


def mass_optimal_blocks(curve: torch.Tensor, total: int, n_kv: int, lo: int, hi: int) -> List[int]:
    """Per-head blocks summing to `total` that hold the most mass by the heads' curves
    [heads, CURVE_POINTS + 1]: the `total` best marginal gains, every head between lo and hi."""
    return spread_blocks(marginal_order(curve_at_blocks(curve.double(), n_kv), lo, hi), total, curve.shape[0])


def marginal_order(at_blocks: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The head of each marginal gain of the heads' masses at k = 0..n_kv blocks [heads, n_kv + 1], best
    first (every head's first lo blocks before any other, none past its hi-th): its first `total`
    entries are the spread of `total` blocks that holds the most mass (spread_blocks). It does not
    depend on `total`, so an annealing budget recounts a prefix instead of sorting every step."""
    n_kv = at_blocks.shape[-1] - 1
    gain = at_blocks.diff(dim=-1)                                   # [heads, n_kv]: gain of block k + 1
    gain = torch.cummin(gain, dim=-1).values                        # non-increasing: picks stay prefixes
    k = torch.arange(1, n_kv + 1)
    gain = torch.where(k <= lo, math.inf, torch.where(k > hi, -math.inf, gain))
    # Ties go to the lower block count, then the lower head: a stable sort of the head-major flat order.
    return torch.sort(-gain.flatten(), stable=True).indices // n_kv


def spread_blocks(order: torch.Tensor, total: int, heads: int) -> List[int]:
    """Per-head blocks of the first `total` marginal gains of marginal_order."""
    return torch.bincount(order[:total], minlength=heads).tolist()


def held_on_curve(curve: Sequence[Sequence[float]], blocks: Sequence[int], n_kv: int) -> List[float]:
    """The mass each head's `blocks` (of n_kv) hold by its curve on the density grid (the host mirror's
    lists): curve_at_blocks read at those block counts only, in the same float64 arithmetic, without
    tensors (from a [heads, n_kv + 1] table rebuilt after each profile it took 0.2 ms per layer on a
    2-core CPU)."""
    held = []
    for row, k in zip(curve, blocks):
        pos = k * (CURVE_POINTS / n_kv)
        lo = min(math.floor(pos), CURVE_POINTS)
        hi = min(lo + 1, CURVE_POINTS)
        w = pos - lo
        held.append(row[lo] * (1 - w) + row[hi] * w)
    return held


def annealed_density(start: float, target: float, steps: int, anneal_steps: int) -> float:
    """Density `steps` into stage 2: from `start` to `target` over `anneal_steps` steps, along a line."""
    if anneal_steps <= 0 or steps >= anneal_steps or math.isnan(start):
        return target
    return start + (target - start) * max(0, steps) / anneal_steps


class ModelBudgetPool:
    """``budget_scope='model'``: the layers built from one DSVConfig (``apply_dsv`` hands every layer
    the same object) spread their blocks together. Each layer's share of its blocks (its annealed
    density times its heads) goes into one total, which goes to the best marginal gains of all the
    layers' heads' mass curves, on the curves' density grid; a layer whose attention is concentrated
    gives blocks to one whose attention is spread. Layers still in stage 1 or without a profiled
    curve keep their own share. Under pipeline parallelism each stage's layers pool among themselves."""

    _pools: dict = {}

    @classmethod
    def of(cls, cfg) -> "ModelBudgetPool":
        pool = cls._pools.get(id(cfg))
        if pool is None or pool.cfg is not cfg:  # an id reused by a new config object: a new pool
            pool = cls._pools[id(cfg)] = cls(cfg)
        return pool

    def __init__(self, cfg):
        self.cfg = cfg
        self._members: list = []
        self._cache = (None, None)

    def add(self, controller) -> None:
        self._members.append(weakref.ref(controller))

    def shares(self, controller) -> Optional[List[float]]:
        """Per-head densities of `controller`'s layer, or None where it keeps its own share."""
        members = [m for m in (ref() for ref in self._members) if m is not None]
        state = [(m, m.host()) for m in members]
        # The curves by value: a load replaces a mirror, and a new tuple may take a freed one's id.
        key = tuple((id(m), h["stage"], h["mass_curve"], m.policy.density(h) if h["stage"] == 2 else None)
                    for m, h in state)
        if self._cache[0] != key:
            self._cache = (key, self._allocate(state))
        return self._cache[1].get(id(controller))

    def _allocate(self, state) -> dict:
        pooled = [(m, h, torch.tensor(h["mass_curve"], dtype=torch.float64)) for m, h in state if h["stage"] == 2]
        pooled = [(m, h, c) for m, h, c in pooled if not bool(torch.isnan(c).any())]
        if not pooled:
            return {}
        lo, hi = block_range(CURVE_POINTS, self.cfg.budget_floor, self.cfg.budget_ceiling)
        heads = [c.shape[0] for _, _, c in pooled]
        units = round(sum(m.policy.density(h) * n * CURVE_POINTS for (m, h, _), n in zip(pooled, heads)))
        units = min(max(units, sum(heads) * lo), sum(heads) * hi)
        spread = mass_optimal_blocks(torch.cat([c for _, _, c in pooled]), units, CURVE_POINTS, lo, hi)
        out, at = {}, 0
        for (m, _, _), n in zip(pooled, heads):
            out[id(m)] = [u / CURVE_POINTS for u in spread[at:at + n]]
            at += n
        return out


class BudgetPolicy:
    """Per-head block counts of one layer from its controller's state, cached until it changes."""

    def __init__(self, cfg, heads: int, owner=None):
        self.cfg, self.heads = cfg, heads
        self._cache: dict = {}
        self._owner = self.pool = None
        if cfg.budget_scope == "model" and owner is not None:  # (a weak reference: no cycle, and only here)
            self._owner = weakref.ref(owner)
            self.pool = ModelBudgetPool.of(cfg)
            self.pool.add(owner)

    def invalidate(self) -> None:
        """The profiled state changed (a profile or a checkpoint load): recompute on next use."""
        self._cache.clear()

    def density(self, host: dict) -> float:
        """Target share of the layer's blocks at this stage-2 step (target policies)."""
        cfg = self.cfg
        return annealed_density(host["anneal_from"], cfg.target_density, host["step"] - host["stage2_start"],
                                cfg.anneal_steps)

    def blocks(self, host: dict, n_kv: int) -> Tuple[int, ...]:
        """Per-head KV blocks out of n_kv."""
        cfg = self.cfg
        lo, hi = block_range(n_kv, cfg.budget_floor, cfg.budget_ceiling)
        shares = self.pool.shares(self._owner()) if self.pool is not None and host["stage"] == 2 else None
        if cfg.budget_policy == "theta" or host["stage"] != 2:  # stage 1: what stage 2 anneals from
            key = ("theta", n_kv)
        elif shares is not None:  # the model-wide spread gave this layer its heads' densities
            return tuple(min(max(round(d * n_kv), lo), hi) for d in shares)
        else:
            key = (cfg.budget_policy, n_kv, total_blocks(self.density(host), self.heads, n_kv, lo, hi))
        if key not in self._cache:
            self._bound()
            self._cache[key] = tuple(self._compute(key, host, n_kv, lo, hi))
        return self._cache[key]

    def held(self, host: dict, n_kv: int) -> Tuple[float, ...]:
        """Mass each head's blocks (blocks()) hold by its profiled curve, NaN before the first profile;
        kept as the blocks are (the metrics read it every step)."""
        blocks = self.blocks(host, n_kv)
        key = ("held", n_kv, blocks)
        if key not in self._cache:
            self._bound()
            self._cache[key] = tuple(held_on_curve(host["mass_curve"], blocks, n_kv))
        return self._cache[key]

    def _bound(self) -> None:
        if len(self._cache) > 64:  # many sequence lengths (packed clips), or annealed blocks: stay bounded
            self._cache.clear()

    def _compute(self, key, host, n_kv, lo, hi) -> List[int]:
        if key[0] == "theta":
            return theta_blocks(host["block_sparsity"], n_kv, lo, hi)
        total = key[2]
        if key[0] == "target" and ("order", n_kv) not in self._cache:
            # The ranking of marginal gains is kept until the next profile: rebuilding the curves' tensor
            # from the mirror's tuples and sorting every annealing step was most of the budgets' host time.
            at_blocks = curve_at_blocks(torch.tensor(host["mass_curve"], dtype=torch.float64), n_kv)
            self._cache[("order", n_kv)] = (None if bool(torch.isnan(at_blocks).any())
                                            else marginal_order(at_blocks, lo, hi))
        order = self._cache.get(("order", n_kv))
        if order is None:  # uniform, or not profiled yet: no curve to spread by
            return uniform_blocks(total, self.heads, lo, hi)
        return spread_blocks(order, total, self.heads)

    def layer_eligible(self, host: dict) -> bool:
        """Whether the layer may run sparse at all (dispatch by cost then decides): in stage 2, and
        under the theta rule only where the layer's mean sparsity clears the threshold."""
        if host["stage"] != 2:
            return False
        if self.cfg.budget_policy != "theta":
            return True
        vals = [v for v in host["block_sparsity"] if not math.isnan(v)]
        return bool(vals) and sum(vals) / len(vals) >= self.cfg.layer_sparsity_threshold
