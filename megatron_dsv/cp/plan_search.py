"""Choose a layer's CP plan by timing the cost model's short list on the layer's own inputs.

The cost model ranks plans well within one (U, schedule) (which heads go where), but across them
it once missed what measurements on 2 H200s showed: the ring schedule's two attention calls and
merge, the exchange's index work, host gaps between phases. It predicted the sequence split (U = 1,
ring) fastest at every length from 32k to 256k, where the head split (U = 2) measured 1.07-1.39x
faster. Its split factors, fitted on 2 and 4 H200s since, fix that on those machines; on others
they are a guess. So, as dispatch by cost does for dense against sparse, the choice between
(U, schedule) pairs is measured: once per shape, every CP rank times the model's best plan of each pair (forward +
backward of the layer's own attention, the slowest rank's time), and the fastest pair is kept;
later re-plans run the model within that pair.
"""

from __future__ import annotations

import time
from typing import Callable, List, Sequence, Tuple

import torch
import torch.distributed as dist

from .groups import HybridCPGroup
from .planner import CPPlan


def measure_plans(plans: Sequence[CPPlan], step: Callable[[CPPlan], None], group: HybridCPGroup, *,
                  warmup: int = 1, iters: int = 2) -> List[float]:
    """Milliseconds of step(plan) per plan: the best of `iters` runs after `warmup`, the slowest CP rank's
    time; identical on every rank (every rank must call this with the same plans, in the same order)."""
    cuda = torch.cuda.is_available() and group.device.type == "cuda"
    times = []
    for p in plans:
        for _ in range(warmup):
            step(p)
        best = float("inf")
        for _ in range(iters):
            dist.barrier(group=group.group)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(p)
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step(p)
                best = min(best, (time.perf_counter() - t0) * 1e3)
        times.append(best)
    t = torch.tensor(times, dtype=torch.float64, device=group.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group.group)
    return t.tolist()


def fastest_plan(plans: Sequence[CPPlan], step: Callable[[CPPlan], None], group: HybridCPGroup,
                 **kwargs) -> Tuple[CPPlan, List[float]]:
    """(the plan of `plans` whose step measured fastest, every plan's ms); ties to the earlier plan."""
    times = measure_plans(plans, step, group, **kwargs)
    return plans[min(range(len(plans)), key=lambda i: (times[i], i))], times
