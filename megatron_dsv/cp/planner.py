"""Planner of the hybrid CP scheme: head -> U-rank assignment, (U, R) and KV schedule from a cost model.

Every rank calls :func:`plan` with the same inputs and gets the same plan: the planner is
plain Python arithmetic on floats with deterministic tie-breaking (no randomness, no
dict-order or device dependence). Budgets must therefore be identical on every rank
(profiled sparsities averaged over the CP group, see :func:`~megatron_dsv.cp.allreduce_head_stats`);
``check_plan_identical`` compares plan digests across ranks in debug mode.

Cost model (per layer, forward + backward, of the slowest rank):
  compute   sum over its heads of min(sparse, dense) kernel time: 4 b S^2 d (1 + bwd) / R FLOPs
            times the head's density at the sparse rate, or all of it at the dense rate
            (the dispatch never runs sparse when dense is faster);
  a2a       q, k, v, out forward and their gradients backward, and the rank-r projections of q and k
            (forward), over NVLink when U fits in a node;
  klr       the all-gather of the low-rank keys for the selection (forward only);
  exchange  the KV blocks a rank's query blocks select from other segments, forward, and their
            gradients backward; unique blocks per head = min(1, kv_union * density) of the
            blocks (an assumption: neighbouring cubes share most of their critical keys), for a
            share f of a split head's query blocks min(1, density * (1 + (kv_union - 1) * f));
            "gather" adds exchange to compute, "ring" overlaps round t+1's transfer with round
            t's forward attention (backward gradients are returned after the backward compute).

Assignment: whole heads cannot balance U ranks when a rank gets only a few heads (2 heads per
rank with 16 heads on U = 8; one head costlier than the mean load), so heads may be split into
shares of their query blocks. A split is not free (every holder receives the whole head and selects
over all its keys; shares select more unique KV blocks together), so the shares are searched on the
cost model, not cut by compute alone; :func:`plan` then takes the fastest plan whose compute is
balanced within ``max_imbalance`` unless that costs more than ``balance_slack``.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ASSIGNMENTS = ("lpt", "capped", "split", "naive")
SCHEDULES = ("gather", "ring")


@dataclass(frozen=True)
class CostModel:
    """Machine parameters of the cost model; every field is an assumption to be calibrated."""

    sparse_tflops: float = 400.0
    """Effective fwd+bwd TFLOP/s of the block-sparse kernel on computed blocks (selection included)."""
    sparse_curve: Tuple[Tuple[float, float], ...] = ()
    """Measured (density, effective fwd+bwd TFLOP/s) points; when given, the rate at a density is
    interpolated linearly between them (clamped at the ends) instead of sparse_tflops."""
    dense_tflops: float = 580.0
    """Fwd+bwd TFLOP/s of the dense kernel (H100 cuDNN, measured: 575-585)."""
    bwd_factor: float = 2.5
    """Backward FLOPs / forward FLOPs."""
    intra_node_gbps: float = 300.0
    """Per-GPU all-to-all bandwidth inside a node, GB/s (H100 NVLink: 450 GB/s per direction, ~2/3 achieved)."""
    inter_node_gbps: float = 45.0
    """Per-GPU bandwidth across nodes, GB/s (one 400 Gb/s InfiniBand NIC per GPU, ~90% achieved)."""
    gpus_per_node: int = 8
    latency_s: float = 15e-6
    """Per message (per peer of a collective, per ring round)."""
    bytes_per_elem: int = 2
    """bf16 activations."""
    kv_union: float = 3.0
    """Unique KV blocks selected by a whole segment, as a multiple of one query block's budget."""
    memory_limit_gib: float = math.inf
    """Per-GPU limit for one layer's attention tensors (q, k, v, out, received blocks, transient buffers)."""
    split_compute_factor: float = 1.25
    """Attention time (selection included) of a rank holding 1 / R of the sequence (R > 1), over its
    share of the whole sequence's compute: the per-segment kernel calls, the gathered KV layout, the
    ring's merges. Fitted with split_exchange_factors on 2 and 4 H200s (bench/cp_model_check.py)."""
    split_exchange_factors: Tuple[Tuple[str, float], ...] = (("gather", 1.75), ("ring", 2.6))
    """Per schedule: the KV exchange's time over its bytes' time on the ring link (+ latency): the
    blocks' gather into send buffers and scatter after them, per round for the ring."""

    def __post_init__(self):
        for name in ("sparse_tflops", "dense_tflops", "intra_node_gbps", "inter_node_gbps", "kv_union",
                     "memory_limit_gib"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CostModel.{name} must be > 0, got {getattr(self, name)}")
        if any(not (0 < x <= 1 and r > 0) for x, r in self.sparse_curve):
            raise ValueError(f"CostModel.sparse_curve needs (density in (0, 1], rate > 0) points, got {self.sparse_curve}")
        if self.gpus_per_node < 1 or self.bytes_per_elem < 1 or self.latency_s < 0 or self.bwd_factor < 0:
            raise ValueError("CostModel: gpus_per_node and bytes_per_elem must be >= 1, latency_s and "
                             "bwd_factor >= 0")
        factors = dict(self.split_exchange_factors)
        if (not self.split_compute_factor > 0 or sorted(factors) != sorted(SCHEDULES)
                or not all(f > 0 for f in factors.values())):
            raise ValueError(f"CostModel: split_compute_factor must be > 0 and split_exchange_factors one factor "
                             f"> 0 per schedule {list(SCHEDULES)}; got {self.split_compute_factor}, "
                             f"{self.split_exchange_factors}")


@dataclass(frozen=True)
class Shape:
    """The attention problem of one layer (whole sequence, all heads)."""

    seq_len: int
    heads: int
    head_dim: int
    batch: int = 1
    block_q: int = 64
    block_kv: int = 64
    lr_rank: int = 16

    @property
    def n_kv(self) -> int:
        return -(-self.seq_len // self.block_kv)


@dataclass(frozen=True)
class CPPlan:
    """One layer's plan.

    ``heads_of[u]``: ascending global head ids that U-rank u computes. Every head appears at least
    once; a head split by the planner appears on several ranks, and ``shares[u][i] = (lo, hi, k)``
    says that rank u computes pieces [lo, hi) of k of head heads_of[u][i]'s query blocks (query
    blocks [lo * n // k, hi * n // k) of each segment of n query blocks). Empty ``shares``: no head
    is split (every share (0, 1, 1)).
    """

    P: int
    U: int
    heads_of: Tuple[Tuple[int, ...], ...]
    assignment: str
    schedule: str
    predicted_s: float
    parts_s: Tuple[Tuple[str, float], ...] = field(default=(), compare=False)
    imbalance: float = 1.0
    shares: Tuple[Tuple[Tuple[int, int, int], ...], ...] = ()

    @property
    def R(self) -> int:
        return self.P // self.U

    def share(self, u: int, i: int) -> Tuple[int, int, int]:
        """(lo, hi, k) of the i-th head of U-rank u."""
        return self.shares[u][i] if self.shares else (0, 1, 1)

    def holders_of(self, head: int) -> Tuple[int, ...]:
        return tuple(u for u, hs in enumerate(self.heads_of) if head in hs)

    def digest(self) -> str:
        """Hash of everything that changes what the ranks do (not of the predicted times)."""
        text = repr((self.P, self.U, self.heads_of, self.shares, self.assignment, self.schedule))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- budgets
def densities(budgets, shape: Shape) -> Tuple[float, ...]:
    """Per-head budgets as fractions of the KV blocks.

    Integer tensors/lists are block counts (clipped to [0, n_kv]); floating ones are fractions in [0, 1].
    """
    if isinstance(budgets, torch.Tensor):
        is_int = not budgets.is_floating_point()
        values = budgets.detach().cpu().tolist()
    else:
        values = list(budgets)
        is_int = all(isinstance(x, int) and not isinstance(x, bool) for x in values)
    if len(values) != shape.heads:
        raise ValueError(f"{len(values)} budgets given for {shape.heads} heads")
    if is_int:
        if any(x < 0 for x in values):
            raise ValueError(f"block-count budgets must be >= 0, got {values}")
        return tuple(min(x, shape.n_kv) / shape.n_kv for x in values)
    if any(not (0.0 <= float(x) <= 1.0) for x in values):
        raise ValueError(f"fraction budgets must lie in [0, 1], got {values}")
    return tuple(float(x) for x in values)


def budget_blocks(budgets, n_kv: int) -> torch.Tensor:
    """Per-head budgets as int64 block counts [H]: fractions -> ceil(f * n_kv); counts clipped to n_kv."""
    t = torch.as_tensor(budgets)
    if t.dim() != 1:
        raise ValueError(f"budgets must be 1-D [heads], got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"fraction budgets must lie in [0, 1], got {t.tolist()}")
        return torch.ceil(t.double() * n_kv - 1e-9).clamp(0, n_kv).to(torch.int64)
    if bool((t < 0).any()):
        raise ValueError(f"block-count budgets must be >= 0, got {t.tolist()}")
    return t.to(torch.int64).clamp(max=n_kv)


# ---------------------------------------------------------------------- assignment
def assign_heads(costs: Sequence[float], U: int, method: str = "lpt") -> Tuple[Tuple[int, ...], ...]:
    """Heads -> U ranks. Returns heads_of (ascending ids per rank); every head exactly once.

    lpt:    longest processing time first: heads by cost descending (ties: lower id), each to the
            rank with the least load (ties: fewer heads, then lower rank); uneven counts allowed;
            then a local search (:func:`_improve`) moves or swaps single heads between any two ranks
            while that lowers the loads sorted in descending order (LPT alone leaves up to one small
            head of excess on a rank, and a search that only unloads the most loaded rank stalls as
            soon as two ranks tie at the top).
    capped: the same with at most ceil(H / U) heads per rank (equal counts when U divides H).
    naive:  Ulysses order: contiguous equal chunks of heads in natural order.
    (split: see :func:`assign_split`.)
    """
    H = len(costs)
    if method not in ("lpt", "capped", "naive"):
        raise ValueError(f"method={method!r} is not one of ['lpt', 'capped', 'naive']")
    _check_U(U, H)
    if method == "naive":
        return tuple(tuple(h for h in range(H) if h * U // H == u) for u in range(U))
    cap = -(-H // U) if method == "capped" else H
    units = _lpt(costs, U, cap)
    _improve(units, lambda held, N: (sum(costs[h] for h in held),), cap=cap, fractional=False)
    return _layout(units, 1)[0]


def assign_split(costs: Sequence[float], U: int, n_units: int):
    """Heads split along their query blocks so that every rank gets the same predicted compute.

    McNaughton's wrap-around rule: heads in natural order are laid end to end (head h has n_units
    units of cost costs[h] / n_units, its query blocks) and cut into U runs of equal cost, at unit
    boundaries; rank u takes run u. Imbalance is at most one unit of the costliest head; a run
    boundary splits at most one head, so at most U - 1 heads are split (more only when one head
    costs more than a rank's share). Returns (heads_of, shares) with shares (lo, hi, n_units).
    This rule needs no cost model (:func:`fixed_plan`); :func:`plan` shapes its split candidate
    with the cost model instead (:func:`_split_by_model`).
    """
    H = len(costs)
    _check_U(U, H)
    if n_units < 1:
        raise ValueError(f"n_units must be >= 1, got {n_units}")
    total = float(sum(costs))
    if total <= 0:
        return assign_heads(costs, U, "lpt"), ()
    # Units laid end to end: position h * n_units + m. Cut u (u = 1..U-1) at the unit nearest to
    # cumulative cost u * total / U, kept strictly increasing so that every rank gets a unit.
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    end = H * n_units
    cuts = [0]
    for u in range(1, U):
        target = u * total / U
        h = next(h for h in range(H) if prefix[h + 1] >= target and costs[h] > 0)
        unit = min(n_units, max(0, round((target - prefix[h]) / (costs[h] / n_units))))
        cuts.append(min(max(h * n_units + unit, cuts[-1] + 1), end - (U - u)))
    cuts.append(end)
    units = [{} for _ in range(U)]
    for u in range(U):
        for h in range(cuts[u] // n_units, H):
            lo, hi = max(cuts[u] - h * n_units, 0), min(cuts[u + 1] - h * n_units, n_units)
            if hi <= 0:
                break
            if hi > lo:
                units[u][h] = hi - lo
    return _layout(units, n_units)


def _check_U(U: int, H: int) -> None:
    if not 1 <= U <= H:
        raise ValueError(f"U={U} must lie in [1, heads={H}] (every head-parallel rank needs a head)")


def _lpt(costs, U, cap):
    """LPT as units (one unit per head): costliest head first (ties: lower id) to the least loaded rank
    with room (ties: fewer heads, then lower rank)."""
    units = [{} for _ in range(U)]
    load = [0.0] * U
    for h in sorted(range(len(costs)), key=lambda h: (-costs[h], h)):
        u = min((u for u in range(U) if len(units[u]) < cap), key=lambda u: (load[u], len(units[u]), u))
        units[u][h] = 1
        load[u] += costs[h]
    return units


def _layout(units, n_units: int):
    """(heads_of, shares) of an assignment in units: the holders of a head take consecutive ranges of
    its query blocks in rank order."""
    start: Dict[int, int] = {}
    heads_of, shares = [], []
    for held in units:
        hs = tuple(sorted(held))
        sh = []
        for h in hs:
            lo = start.get(h, 0)
            sh.append((lo, lo + held[h], n_units))
            start[h] = lo + held[h]
        heads_of.append(hs)
        shares.append(tuple(sh))
    return tuple(heads_of), tuple(shares)


def _improve(units, key, *, cap: int, fractional: bool, max_steps: Optional[int] = None) -> None:
    """Local search on an assignment, in place.

    units[u] = {head: units of the head's query blocks that rank u computes} (a head has the same
    number of units wherever it is held); key(units[u], N) -> tuple: the cost of rank u when the ranks
    hold N (head, rank) pairs together (a split head counts once per holder: it costs every holder
    communication). Minimises the ranks' keys sorted in descending order, lexicographically, so that
    lowering one of several ranks tied at the top counts as progress. Each step scans the ranks from
    the highest key and applies the best move off the first rank that has an improving one: all of
    its units of a head to another rank, a swap of two ranks' holdings, or (fractional) the part of
    a head that brings the giver's and the taker's keys closest. A rank keeps at least one head and
    holds at most `cap`. Deterministic: fixed scan order, ties to the first move found, differences
    below a relative 1e-9 ignored (so it also ends).
    """
    U = len(units)
    for _ in range(max_steps or 8 * U * sum(map(len, units))):
        N = sum(map(len, units))
        keys = {N: [key(held, N) for held in units]}
        current = sorted(keys[N], reverse=True)
        for a in sorted(range(U), key=lambda u: keys[N][u], reverse=True):
            best = None
            for b in range(U):
                if b == a:
                    continue
                for new_a, new_b in _moves(units[a], units[b], key, N, cap, fractional):
                    n2 = N + len(new_a) + len(new_b) - len(units[a]) - len(units[b])
                    pair = sorted((key(new_a, n2), key(new_b, n2)), reverse=True)
                    if n2 == N and not _less(pair, sorted((keys[N][a], keys[N][b]), reverse=True)):
                        continue   # the other ranks are unchanged: no gain
                    if n2 not in keys:
                        keys[n2] = [key(held, n2) for held in units]
                    ks = list(keys[n2])
                    ks[a], ks[b] = pair
                    ks.sort(reverse=True)
                    if best is None or _less(ks, best[0]):
                        best = (ks, b, new_a, new_b)
            if best is not None and _less(best[0], current):
                units[a], units[best[1]] = best[2], best[3]
                break
        else:
            return


def _moves(giver, taker, key, N, cap, fractional):
    """Candidate (giver, taker) holdings after one move of units from giver to taker, or a swap."""
    for x in sorted(giver):
        fits = x in taker or len(taker) < cap
        if fits and len(giver) > 1:
            yield _moved(giver, taker, x, giver[x])
        if fits and fractional and giver[x] > 1 and _may_take(giver, taker, x, key, N):
            m = _balancing_part(giver, taker, x, key, N + (x not in taker))
            for part in sorted({max(1, m - 1), m}):
                yield _moved(giver, taker, x, part)
        if x not in taker:
            for y in sorted(taker):
                if y not in giver:
                    g, t = dict(giver), dict(taker)
                    g[y], t[x] = t.pop(y), g.pop(x)
                    yield g, t


def _may_take(giver, taker, x, key, N) -> bool:
    """Whether the taker stays below the giver's key when it takes one unit of head x (the least a part
    can add, a new head's whole communication included); if not, no part of x helps."""
    return key(_moved(giver, taker, x, 1)[1], N + (x not in taker)) < key(giver, N)


def _balancing_part(giver, taker, x, key, N):
    """Smallest part m in [1, giver[x] - 1] of head x whose move leaves the giver's key at most the
    taker's (the largest part if none does); bisection: the giver's key falls as m grows, the taker's rises."""
    lo, hi = 1, giver[x] - 1
    while lo < hi:
        mid = (lo + hi) // 2
        g, t = _moved(giver, taker, x, mid)
        if key(g, N) <= key(t, N):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _moved(giver, taker, x, m):
    g, t = dict(giver), dict(taker)
    g[x] -= m
    if not g[x]:
        del g[x]
    t[x] = t.get(x, 0) + m
    return g, t


def _less(a, b, rel: float = 1e-9) -> bool:
    """a < b for sequences of float tuples compared lexicographically, ignoring relative differences
    below rel."""
    for ka, kb in zip(a, b):
        for x, y in zip(ka, kb):
            if abs(x - y) > rel * max(abs(x), abs(y)):
                return x < y
    return False


def _split_by_model(start, costs, dens, n_units: int, model: "_RankModel", limit: float):
    """plan()'s "split" candidate: from a whole-head assignment, heads moved, swapped and split into
    shares of their query blocks by :func:`_improve` on the modelled rank times, after first bringing
    every rank's compute under `limit` (the imbalance bound). Splitting a head is not free: each
    holder receives the whole head and selects over all its keys, and shares select more unique KV
    blocks together than the whole head; the model weighs that against the balance gained."""
    @functools.lru_cache(maxsize=None)
    def part(h, m):   # (compute, blocks) of m units of head h
        return costs[h] * m / n_units, _share_blocks(dens[h], m / n_units, model.cost.kv_union)

    def key(held, N):
        compute = blocks = 0.0
        for h, m in held.items():
            c, x = part(h, m)
            compute += c
            blocks += x
        return max(0.0, compute - limit), model.time(compute, blocks, len(held), N)

    units = [dict.fromkeys(hs, n_units) for hs in start]
    _improve(units, key, cap=len(costs), fractional=True)
    heads_of, shares = _layout(units, n_units)
    split = any(m < n_units for held in units for m in held.values())
    return heads_of, (shares if split else ())


# ---------------------------------------------------------------------- cost model
def sparse_rate(density: float, cost: CostModel) -> float:
    """Effective fwd+bwd TFLOP/s of the sparse kernel at a density."""
    pts = sorted(cost.sparse_curve)
    if not pts:
        return cost.sparse_tflops
    if density <= pts[0][0]:
        return pts[0][1]
    for (x0, r0), (x1, r1) in zip(pts, pts[1:]):
        if density <= x1:
            return r0 + (r1 - r0) * (density - x0) / (x1 - x0)
    return pts[-1][1]


def head_compute_s(density: float, shape: Shape, R: int, cost: CostModel) -> float:
    """Forward+backward attention time of one head on one rank (S / R queries over S keys).

    The layer runs the dense kernel when it is faster than the sparse one at this density.
    """
    flops = 4.0 * shape.batch * shape.seq_len * shape.seq_len * shape.head_dim * (1 + cost.bwd_factor) / R
    if density <= 0:
        return 0.0
    return min(density * flops / (sparse_rate(density, cost) * 1e12), flops / (cost.dense_tflops * 1e12))


def link_s(nbytes: float, remote_fraction: float, peers: int, cost: CostModel) -> float:
    """Time of a transfer whose bytes go partly to other nodes (separate links, in parallel)."""
    if nbytes <= 0:
        return 0.0
    intra = nbytes * (1 - remote_fraction) / (cost.intra_node_gbps * 1e9)
    inter = nbytes * remote_fraction / (cost.inter_node_gbps * 1e9)
    return max(intra, inter) + peers * cost.latency_s


def remote_fraction(P: int, U: int, group: str, cost: CostModel) -> float:
    """Share of a U-group (or R-group) peer's traffic that leaves the node (rank c lives on node c // gpn)."""
    gpn = cost.gpus_per_node
    if P <= gpn:
        return 0.0
    if group == "U":
        return 0.0 if U <= gpn and gpn % U == 0 else 1.0 - 1.0 / max(1, math.ceil(U / gpn))
    R = P // U
    same_node = max(1, gpn // U) if U <= gpn else 1
    return (R - min(R, same_node)) / max(1, R - 1)


def _share_blocks(density: float, f: float, kv_union: float) -> float:
    """Unique KV blocks (fraction of all) that a share f of a head's query blocks selects: between one
    query block's budget (f -> 0) and the whole segment's union (f = 1)."""
    return min(1.0, density * (1 + (kv_union - 1) * f))


class _RankModel:
    """The cost model of one rank for one (shape, P, U, schedule), from the rank's totals: compute
    seconds, unique KV blocks (:func:`_share_blocks` summed over its heads), n heads held, and N heads
    held by all U ranks together (a split head counts once per holder)."""

    def __init__(self, shape: Shape, P: int, U: int, schedule: str, cost: CostModel):
        self.shape, self.P, self.U, self.schedule, self.cost = shape, P, U, schedule, cost
        self.R = P // U
        self.rf_U = remote_fraction(P, U, "U", cost)
        self.rf_R = remote_fraction(P, U, "R", cost)
        self.remote_blocks = shape.n_kv * shape.batch * (self.R - 1) / self.R   # KV blocks per unit of blocks
        # What a rank holding part of the sequence pays beyond its share (CostModel's split factors).
        self.compute_factor = cost.split_compute_factor if self.R > 1 else 1.0
        self.exchange_factor = dict(cost.split_exchange_factors)[schedule]
        self._comm: Dict[Tuple[int, int], Tuple[float, ...]] = {}

    def parts(self, compute: float, blocks: float, n: int, N: int) -> Dict[str, float]:
        attn, exchange, x_bytes = self._attention(compute, blocks)
        compute = compute * self.compute_factor   # as _attention charges it
        comm, a2a, klr, a2a_bytes = self._head_comm(n, N)
        # q, k, v, out of my heads + received blocks (kept for backward) + transient send/recv buffers.
        transient = x_bytes if self.schedule == "gather" or self.R == 1 else 2 * x_bytes / (self.R - 1)
        seg_bytes = self.shape.seq_len / self.R * self.shape.batch * self.shape.head_dim * self.cost.bytes_per_elem
        mem_bytes = 4 * seg_bytes * n + x_bytes + transient
        return dict(total=attn + comm, compute=compute, a2a=a2a, klr=klr, exchange=exchange,
                    memory_gib=mem_bytes / 2 ** 30, exchange_bytes=x_bytes, a2a_bytes=a2a_bytes)

    def time(self, compute: float, blocks: float, n: int, N: int) -> float:
        return self._attention(compute, blocks)[0] + self._head_comm(n, N)[0]

    def _head_comm(self, n, N):
        """(a2a + klr, a2a, klr, a2a bytes): the transfers that every head held costs in full."""
        if (n, N) not in self._comm:
            shape, cost, U, R = self.shape, self.cost, self.U, self.R
            S, b, d, e = shape.seq_len, shape.batch, shape.head_dim, cost.bytes_per_elem
            # A split head costs each holder whole-head all-to-all and low-rank-key transfers.
            # Head all-to-all: 4 tensors forward (q, k, v, out) and 4 backward, and before them the
            # rank-r projections of q and k that selection reads (forward only).
            a2a_bytes = (8 * d + 2 * shape.lr_rank) * S / self.P * b * e * max(N - n, (U - 1) * n)
            a2a = link_s(a2a_bytes, self.rf_U, 10 * (U - 1), cost) if U > 1 else 0.0
            klr = link_s((R - 1) * S / R * b * n * shape.lr_rank * e, self.rf_R, R - 1, cost) if R > 1 else 0.0
            self._comm[n, N] = (a2a + klr, a2a, klr, a2a_bytes)
        return self._comm[n, N]

    def _attention(self, compute, blocks):
        """(attention incl. the KV exchange, exchange, exchange bytes) of a rank's compute and blocks."""
        shape, cost, R = self.shape, self.cost, self.R
        # Unique remote KV blocks, forward (K|V) and backward (their gradients).
        blocks = blocks * self.remote_blocks
        x_bytes = blocks * shape.block_kv * 2 * shape.head_dim * cost.bytes_per_elem
        if R == 1:
            exchange_fwd = exchange_bwd = 0.0
        else:
            x = self.exchange_factor
            exchange_fwd = x * link_s(x_bytes + blocks * 8, self.rf_R, 2 * (R - 1), cost)   # + block ids
            exchange_bwd = x * link_s(x_bytes, self.rf_R, R - 1, cost)
        compute = compute * self.compute_factor
        fwd = compute / (1 + cost.bwd_factor)
        bwd = compute - fwd
        if self.schedule == "gather" or R == 1:
            attn = compute + exchange_fwd + exchange_bwd
        else:  # ring: R rounds, round t+1 in flight during round t's forward
            per_round_c, per_round_x = fwd / R, exchange_fwd / (R - 1)
            attn = per_round_c + (R - 1) * max(per_round_c, per_round_x) + bwd + exchange_bwd
        return attn, exchange_fwd + exchange_bwd, x_bytes

    def lower_bound(self, costs, dens) -> float:
        """At most the slowest rank's time of any assignment of these heads, split or not.

        The time is convex in (compute, blocks, n) at a fixed N, so the slowest rank takes at least the
        time of the mean rank (Jensen; mean n = N / U); that grows with N >= H and with the blocks, which
        splitting only adds (min(1, x) + min(1, y) >= min(1, x + y)). The one exception to convexity,
        no exchange (and no message latency, times the schedule's exchange factor) for a rank without
        selected blocks, is taken off."""
        H, U = len(costs), self.U
        blocks = sum(_share_blocks(x, 1.0, self.cost.kv_union) for x in dens) / U
        slack = 3 * (self.R - 1) * self.cost.latency_s * self.exchange_factor
        return self.time(sum(costs) / U, blocks, H / U, H) - slack


def estimate(shape: Shape, dens: Sequence[float], P: int, U: int, heads_of, schedule: str,
             cost: CostModel, shares=()) -> Dict[str, float]:
    """Modelled fwd+bwd time of the slowest rank and its parts (seconds), and the largest memory of any rank (GiB)."""
    model = _RankModel(shape, P, U, schedule, cost)
    R, N = P // U, sum(len(hs) for hs in heads_of)
    rows = []
    for u, hs in enumerate(heads_of):
        frac = _fractions(shares, u, len(hs))
        compute = sum(f * head_compute_s(dens[h], shape, R, cost) for h, f in zip(hs, frac))
        blocks = sum(_share_blocks(dens[h], f, cost.kv_union) for h, f in zip(hs, frac))
        rows.append(model.parts(compute, blocks, len(hs), N))
    worst = max(rows, key=lambda r: r["total"])
    return dict(worst, memory_gib=max(r["memory_gib"] for r in rows))


def _fractions(shares, u: int, n: int):
    """Shares of their query blocks that rank u computes of its n heads."""
    return [(hi - lo) / k for lo, hi, k in shares[u]] if shares else [1.0] * n


def paper_like_densities(layers: int, heads: int, *, seed: int = 0, floor: float = 0.05,
                         p_dense_head: float = 0.1):
    """Per-layer, per-head budgets (fractions) shaped like DSV's profiles, for simulations and tests.

    First and last layers dense (1.0); in the others most heads are 90-98% sparse and a head is
    78-84% sparse with probability p_dense_head; budgets = max(floor, 1 - sparsity)
    (floor = DSVConfig.budget_floor). Deterministic in seed (torch.Generator, CPU).
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(layers):
        if layer in (0, layers - 1):
            out.append(tuple([1.0] * heads))
            continue
        u = torch.rand(heads, generator=gen, dtype=torch.float64)
        pick = torch.rand(heads, generator=gen, dtype=torch.float64) < p_dense_head
        sparsity = torch.where(pick, 0.78 + 0.06 * u, 0.90 + 0.08 * u)
        out.append(tuple(max(floor, 1.0 - float(x)) for x in sparsity))
    return out


def _divisors(P: int):
    return [U for U in range(1, P + 1) if P % U == 0]


def _head_parallel_sizes(shape: Shape, P: int, cost: CostModel, U_candidates, max_U) -> List[int]:
    """The U to try: U_candidates (default: divisors of P up to min(heads, max_U); max_U defaults to a node's
    GPUs), those that divide P and are at most the heads."""
    max_U = cost.gpus_per_node if max_U is None else max_U
    cands = U_candidates if U_candidates is not None else [U for U in _divisors(P) if U <= min(shape.heads, max_U)]
    cands = [U for U in cands if P % U == 0 and 1 <= U <= shape.heads]
    if not cands:
        raise ValueError(f"no head-parallel size U fits P={P}, heads={shape.heads} (U must divide P, U <= heads)")
    return cands


def plan(budgets, *, shape: Shape, P: int, cost: CostModel = CostModel(), U_candidates: Optional[Sequence[int]] = None,
         schedules: Sequence[str] = SCHEDULES, assignments: Sequence[str] = ("lpt", "capped", "split"),
         max_U: Optional[int] = None, max_imbalance: float = 1.05, balance_slack: float = 0.1) -> CPPlan:
    """The fastest modelled plan for one layer whose compute is balanced within max_imbalance.

    Args:
        budgets: per-head budgets [heads]: fractions of the KV blocks (floats) or block counts (ints).
        shape: the layer's attention shape (whole sequence). P: the context-parallel size.
        U_candidates: head-parallel sizes to try (default: divisors of P up to min(heads, max_U));
            max_U defaults to gpus_per_node (the head all-to-all stays inside a node).
        schedules, assignments: variants to try. "lpt", "capped", "naive" place whole heads by their
            predicted compute (:func:`assign_heads`), the same for every schedule; "split" is searched
            on the cost model for each (U, schedule) (:func:`_split_by_model`), from the lpt and from
            the capped assignment (its plan may end up splitting no head).
        max_imbalance: bound on max / mean of the U ranks' predicted compute.
        balance_slack: the fastest plan within max_imbalance is chosen when it is at most this much
            (relative) slower than the fastest plan of all, else the fastest. A plan whose ranks take
            equal modelled times with unequal compute trades compute for communication at the exchange
            rate of the cost model's bandwidths, which are assumptions: balanced compute is the safer
            bet while it costs little; the slack keeps it from costing much (U = 1 is always balanced).
            math.inf: always the fastest balanced plan if there is one; 0: the fastest plan found
            (the split search still aims at max_imbalance first; max_imbalance=math.inf searches for
            time alone).
    The split search costs far more than the rest, so it runs last, in ascending order of the model's
    lower bound for (U, schedule), and stops at the first bound that could not change the choice.
    Ties go to the earlier candidate (smaller U, then the order of assignments and schedules, split
    searches after all others), so the result is a pure function of the inputs.
    """
    dens = densities(budgets, shape)
    cands = _head_parallel_sizes(shape, P, cost, U_candidates, max_U)
    for s in schedules:
        if s not in SCHEDULES:
            raise ValueError(f"schedule {s!r} is not one of {list(SCHEDULES)}")
    for a in assignments:
        if a not in ASSIGNMENTS:
            raise ValueError(f"assignment {a!r} is not one of {list(ASSIGNMENTS)}")
    if not (max_imbalance >= 1 and balance_slack >= 0):
        raise ValueError(f"need max_imbalance >= 1 and balance_slack >= 0, got {max_imbalance}, {balance_slack}")
    choice = _Choice(max_imbalance, balance_slack)
    searches = []
    for U in cands:
        costs = [head_compute_s(x, shape, P // U, cost) for x in dens]
        whole = {m: assign_heads(costs, U, m) for m in ("lpt", "capped", "naive")
                 if m in assignments or (m != "naive" and "split" in assignments)}
        for schedule in schedules:
            model = _RankModel(shape, P, U, schedule, cost)
            for method in assignments:
                if method != "split":
                    choice.offer(_candidate(model, dens, costs, whole[method], (), method))
            if "split" in assignments:
                searches.append((model.lower_bound(costs, dens), len(searches), model, costs, whole))
    for bound, _, model, costs, whole in sorted(searches, key=lambda s: s[:2]):
        if not choice.could_change(bound):
            break
        n_units = max(1, shape.seq_len // (model.R * shape.block_q))   # query blocks per segment
        limit = max_imbalance * sum(costs) / model.U
        for start in dict.fromkeys((whole["lpt"], whole["capped"])):   # often the same
            heads_of, shares = _split_by_model(start, costs, dens, n_units, model, limit)
            choice.offer(_candidate(model, dens, costs, heads_of, shares, "split"))
    if choice.fastest is None:
        raise ValueError(f"no plan fits the memory limit of {cost.memory_limit_gib} GiB")
    return choice.best()


def candidate_plans(budgets, *, shape: Shape, P: int, cost: CostModel = CostModel(),
                    U_candidates: Optional[Sequence[int]] = None, schedules: Sequence[str] = SCHEDULES,
                    max_U: Optional[int] = None, **plan_kwargs) -> List[CPPlan]:
    """The model's plan (:func:`plan`) for each (U, schedule), fastest predicted first: the short list that
    :func:`megatron_dsv.cp.plan_search.measure_plans` times when the model's absolute times are not to be
    trusted (the ring's merge and the exchange's index work are in it only as factors fitted on H200s, host
    gaps not at all). A schedule only differs where R > 1, so U = P is listed once."""
    out = []
    for U in _head_parallel_sizes(shape, P, cost, U_candidates, max_U):
        for schedule in (schedules if P // U > 1 else schedules[:1]):
            out.append(plan(budgets, shape=shape, P=P, cost=cost, U_candidates=[U], schedules=[schedule],
                            **plan_kwargs))
    return sorted(out, key=lambda p: p.predicted_s)


class _Choice:
    """plan()'s choice among the candidates offered: the fastest balanced plan (imbalance within
    max_imbalance, up to rounding) when within slack of the fastest of all, else the fastest;
    ties to the first offered."""

    def __init__(self, max_imbalance: float, slack: float):
        self.max_imbalance, self.slack = max_imbalance, slack
        self.fastest: Optional[CPPlan] = None
        self.balanced: Optional[CPPlan] = None

    def offer(self, p: Optional[CPPlan]) -> None:
        if p is None:
            return
        if self.fastest is None or p.predicted_s < self.fastest.predicted_s:
            self.fastest = p
        if p.imbalance <= self.max_imbalance * (1 + 1e-9) and (
                self.balanced is None or p.predicted_s < self.balanced.predicted_s):
            self.balanced = p

    def could_change(self, bound: float) -> bool:
        """Whether a plan taking at least `bound` seconds could change :meth:`best`."""
        if self.fastest is None:
            return True
        beaten = self.balanced.predicted_s if self.balanced is not None else math.inf
        return bound < min(beaten, self.fastest.predicted_s * (1 + self.slack))

    def best(self) -> Optional[CPPlan]:
        if self.balanced is not None and self.balanced.predicted_s <= self.fastest.predicted_s * (1 + self.slack):
            return self.balanced
        return self.fastest


def _candidate(model: _RankModel, dens, costs, heads_of, shares, method: str) -> Optional[CPPlan]:
    """The plan of one assignment under one (U, schedule), or None when it exceeds the memory limit."""
    est = estimate(model.shape, dens, model.P, model.U, heads_of, model.schedule, model.cost, shares)
    if est["memory_gib"] > model.cost.memory_limit_gib:
        return None
    parts = tuple((k, float(v)) for k, v in est.items() if k != "total")
    return CPPlan(model.P, model.U, heads_of, method, model.schedule, float(est["total"]), parts,
                  _imbalance(costs, heads_of, shares), shares)


def _imbalance(costs, heads_of, shares) -> float:
    """max / mean of the per-rank predicted compute."""
    loads = [sum(costs[h] * f for h, f in zip(hs, _fractions(shares, u, len(hs)))) for u, hs in enumerate(heads_of)]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def fixed_plan(P: int, U: int, heads: int, *, schedule: str = "gather", assignment: str = "naive",
               costs: Optional[Sequence[float]] = None, n_units: int = 1) -> CPPlan:
    """A plan with a given (U, schedule) and assignment method (naive order by default), no cost model.

    n_units: query blocks per segment, the unit of the "split" assignment (:func:`assign_split`)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {list(SCHEDULES)}")
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment={assignment!r} is not one of {list(ASSIGNMENTS)}")
    if P % U:
        raise ValueError(f"U={U} must divide P={P}")
    costs = [1.0] * heads if costs is None else list(costs)
    if assignment == "split":
        heads_of, shares = assign_split(costs, U, n_units)
    else:
        heads_of, shares = assign_heads(costs, U, assignment), ()
    return CPPlan(P, U, heads_of, assignment, schedule, float("nan"), imbalance=_imbalance(costs, heads_of, shares),
                  shares=shares)


class Replanner:
    """Keeps one layer's plan and recomputes it every ``interval`` steps from the current budgets."""

    def __init__(self, interval: int, **plan_kwargs):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.interval = interval
        self.plan_kwargs = plan_kwargs
        self.current: Optional[CPPlan] = None
        self.step = 0

    def __call__(self, budgets) -> CPPlan:
        """Plan for this step; call once per training step with identical budgets on every rank."""
        if self.current is None or self.step % self.interval == 0:
            self.current = plan(budgets, **self.plan_kwargs)
        self.step += 1
        return self.current
