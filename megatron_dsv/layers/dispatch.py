"""Dispatch by cost: a stage-2 layer runs sparse only where that is faster than dense at its shape.

Sparse attention pays by density only above some sequence length: selection, the index lists
and launch costs are fixed per call, so the density at which sparse stops paying falls as
sequences get shorter (and differs by GPU, head dim and block size). So the decision is made
from times measured on the device: the first time a layer meets a shape (sequence length,
batch, heads, head dim, dtype, block sizes) in stage 2, that shape's dense attention forward +
backward and selection + block-sparse forward + backward at two densities are timed on the
layer's own q, k, v (CUDA events, medians), once per process; sparse time is linear in the
density, so the two points give the density up to which sparse beats dense. Measuring on the
device, not from a packaged table, covers GPUs and shapes no table lists; the price is well
under a second per new shape, once, and a one-line notice says what was measured.

Where nothing can be measured (CPU reference kernels, the Triton interpreter, or context
parallelism, whose ranks must all decide alike), the density rule decides: sparse while the
layer's mean budget is at most ``dense_fallback_density``, with a one-line notice.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional

import torch

from ..notice import notice
from ..timing import time_ms, timing_autograd

# The two densities sparse attention is timed at; the line through them predicts the rest.
PROBE_DENSITIES = (0.05, 0.3)


class Costs(NamedTuple):
    """Measured milliseconds of one shape: dense fwd+bwd; selection + sparse fwd+bwd = fixed + per_density * density."""
    dense_ms: float
    fixed_ms: float
    per_density_ms: float

    def sparse_ms(self, density: float) -> float:
        return self.fixed_ms + self.per_density_ms * density

    @property
    def crossover(self) -> float:
        """Density up to which sparse is predicted faster (0 if never, above 1 if always)."""
        if self.per_density_ms <= 0:
            return math.inf if self.fixed_ms < self.dense_ms else 0.0
        return max(0.0, (self.dense_ms - self.fixed_ms) / self.per_density_ms)


def measure_costs(q, k, v, *, select: Callable, attend: Callable, dense: Callable, reps: int = 3) -> Costs:
    """Time dense and sparse forward + backward on copies of q, k, v [s, b, heads, d] (CUDA).

    select(q, k, density) -> selection; attend(q, k, v, selection) -> out; dense(q, k, v) -> out.
    """
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    grad = torch.randn_like(leaves[0]).reshape(q.shape[0], q.shape[1], -1)

    def fwd_bwd(out):
        out.reshape(grad.shape).backward(grad)
        for t in leaves:
            t.grad = None

    with timing_autograd():
        dense_ms = time_ms(lambda: fwd_bwd(dense(*leaves)), q.device, warmup=1, iters=reps)
        sparse = []
        for density in PROBE_DENSITIES:
            def step(density=density):
                with torch.no_grad():
                    selection = select(leaves[0].detach(), leaves[1].detach(), density)
                fwd_bwd(attend(*leaves, selection))
            sparse.append(time_ms(step, q.device, warmup=1, iters=reps))
    (d0, d1), (t0, t1) = PROBE_DENSITIES, sparse
    slope = (t1 - t0) / (d1 - d0)
    return Costs(dense_ms, t0 - slope * d0, slope)


class CostDispatch:
    """Sparse-or-dense decisions of one layer, from measured costs per shape (shared by all layers
    of the process through `_MEASURED`) or the density rule."""

    _MEASURED: Dict[tuple, Costs] = {}

    def __init__(self, cfg):
        self.cfg = cfg

    def measured(self, device: torch.device, distributed_cp: bool) -> bool:
        """Whether this call can be decided from measured times."""
        mode = self.cfg.dispatch
        can = device.type == "cuda" and self.cfg.backend != "reference" and not distributed_cp
        if mode == "measured" and not can:
            raise ValueError("DSVConfig.dispatch='measured' needs GPU kernels on CUDA and no context "
                             f"parallelism (device {device}, backend {self.cfg.backend!r}, context parallel "
                             f"{distributed_cp}); use dispatch='density' or 'auto'")
        return mode != "density" and can

    def sparse_pays(self, density: float, key: Optional[tuple] = None,
                    measure: Optional[Callable[[], Costs]] = None) -> bool:
        """Whether a layer with this mean budget should run sparse. With a shape `key` and a `measure`
        function the measured costs decide (measured once per key); without, the density rule."""
        if key is None:
            notice(f"no kernel times measured here (dispatch={self.cfg.dispatch!r}, backend={self.cfg.backend!r}): "
                   f"a stage-2 layer runs sparse while its mean budget is at most dense_fallback_density="
                   f"{self.cfg.dense_fallback_density}")
            return density <= self.cfg.dense_fallback_density
        costs = self._MEASURED.get(key)
        if costs is None and torch.compiler.is_compiling():   # no timing inside a traced graph: the density
            return density <= self.cfg.dense_fallback_density  # rule, until an eager call has measured this shape
        if costs is None:
            costs = self._MEASURED[key] = measure()
            notice(f"attention at {_describe(key)}: dense fwd+bwd {costs.dense_ms:.2f} ms, selection + sparse "
                   f"{costs.sparse_ms(0.1):.2f} ms at 10% of the blocks; sparse pays up to a density of "
                   f"{min(costs.crossover, 1.0):.2f}")
        return costs.sparse_ms(density) < costs.dense_ms

    def costs(self, key: tuple) -> Optional[Costs]:
        """What was measured for a shape (None if nothing was)."""
        return self._MEASURED.get(key)


def _describe(key: tuple) -> str:
    s, b, heads, d, dtype, block_q, block_kv = key[:7]
    return f"{s} tokens x batch {b}, {heads} heads x {d}, {str(dtype).replace('torch.', '')}, blocks {block_q}x{block_kv}"
