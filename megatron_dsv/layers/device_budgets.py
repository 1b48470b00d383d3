"""A layer's per-head budgets of its training steps, kept in a tensor on the device.

A step replayed from a CUDA graph (the layer's own graphs, graphed.py, or a whole-step graph,
step_graph.py) reads the budgets the graph was captured with, and torch.compile guards on Python
ints: with the budgets as host ints, every change of budgets meant a recapture (three eager steps
and a capture) or a recompile. The target policy's anneal changes them every step or two, and
every stage-2 profile may move a head's budget by a block. So the selection reads them from this
tensor, which is updated in place, on the stream, before the step's kernels are queued; a graph
then depends only on k_max (the width of the block lists), rounded up to a power of two, so the
anneal from the theta rule's density to 0.1 crosses a few k_max values.
The GPU kernels loop over each query block's count, not over k_max, so the rounding costs only the
-1 padding of the lists. Off the GPU, k_max is the largest budget: there are no CUDA graphs, and
the pure-torch reference gathers every slot up to k_max, so a rounded k_max costs it compute.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class DeviceBudgets:
    def __init__(self):
        self.values: Optional[tuple] = None   # the budgets the tensor holds (host copy)
        self.tensor: Optional[torch.Tensor] = None   # int64 [heads] on the device
        self.k_max: Optional[int] = None

    def hold(self, budgets: Sequence[int], n_kv: int, device: torch.device) -> None:
        """Make the tensor hold `budgets` (ints, already at most n_kv): copied only when they change."""
        values = tuple(budgets)
        if values == self.values and self.tensor.device == device:
            return
        host = torch.tensor(values, dtype=torch.int64)
        if self.tensor is None or self.tensor.device != device or self.tensor.shape != host.shape:
            self.tensor = host.to(device)
        else:   # in place: graphs captured over the tensor read the new values
            self.tensor.copy_(host.pin_memory() if device.type == "cuda" else host, non_blocking=True)
        self.values = values
        largest = max(max(values), 1)
        self.k_max = min(n_kv, 1 << (largest - 1).bit_length()) if device.type == "cuda" else largest
