"""A layer's per-head budgets of its training steps, kept in a tensor on the device.

A step replayed from a CUDA graph (the layer's own graphs, graphed.py, or a whole-step graph,
step_graph.py) reads the budgets the graph was captured with, and torch.compile guards on Python
ints: with the budgets as host ints, every change of budgets meant a recapture (three eager steps
and a capture) or a recompile. The target policy's anneal changes them every step or two, and
every stage-2 profile may move a head's budget by a block. So the selection reads them from this
tensor, which is updated in place, on the stream, before the step's kernels are queued; a graph
then depends only on k_max (the width of the block lists), rounded up to a power of two.
The GPU kernels loop over each query block's count, not over k_max; a wider list costs its -1
padding, the selection's top-k and the backward's transposition of the lists over the wider width.
Each new k_max still means a recapture (eager steps, then a capture), and the layers of
a model cross the powers of two at different steps of the anneal, each crossing a recapture of the
whole step (step_graph.py). So while the budgets anneal the width only grows; it settles at the
end, and afterwards shrinks only with a margin (the largest budget at most 3/4 of the narrower
width), so profiles that move a head's budget by a block across a power of two do not recapture.
Off the GPU, k_max is the largest budget: there are no CUDA graphs, and the pure-torch reference
gathers every slot up to k_max, so a wider list costs it compute.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class DeviceBudgets:
    def __init__(self, rounded: Optional[bool] = None):
        """rounded: k_max a power of two that only grows while annealing (default: on CUDA)."""
        self.rounded = rounded
        self.values: Optional[tuple] = None   # the budgets the tensor holds (host copy)
        self.tensor: Optional[torch.Tensor] = None   # int64 [heads] on the device
        self.k_max: Optional[int] = None
        self.n_kv: Optional[int] = None   # the KV blocks k_max was chosen for
        self._settled = False   # budgets held since the anneal ended (or under a policy without one)

    def hold(self, budgets: Sequence[int], n_kv: int, device: torch.device, *, annealing: bool = False) -> None:
        """Make the tensor hold `budgets` (ints, already at most n_kv): copied only when they change.
        annealing: the budgets are still annealing (a rounded k_max only grows)."""
        values = tuple(budgets)
        if (values == self.values and n_kv == self.n_kv and self.tensor.device == device
                and self._settled == (not annealing)):
            return
        host = torch.tensor(values, dtype=torch.int64)
        if n_kv != self.n_kv:   # another sequence length: the width starts afresh
            self.k_max, self.n_kv = None, n_kv
        if self.tensor is None or self.tensor.device != device or self.tensor.shape != host.shape:
            self.tensor = host.to(device)
            self.k_max = None
        elif values != self.values:   # in place: graphs captured over the tensor read the new values
            self.tensor.copy_(host.pin_memory() if device.type == "cuda" else host, non_blocking=True)
        self.values = values
        largest = max(max(values), 1)
        if not (device.type == "cuda" if self.rounded is None else self.rounded):
            self.k_max = largest
        else:
            width = min(n_kv, 1 << (largest - 1).bit_length())
            settling = not annealing and not self._settled   # the anneal's end: the width it ends at
            if (self.k_max is None or width > self.k_max or settling
                    or (not annealing and width < self.k_max and 4 * largest <= 3 * width)):
                self.k_max = width
        self._settled = not annealing
