"""Selection + block-sparse attention of one layer replayed from CUDA graphs, for short sequences.

At short sequences a stage-2 layer is bound by host time, not by the GPU: the projections,
the selection (score kernel, top-k, sort) and the attention forward and backward are some
thirty kernel launches and their Python, while the kernels themselves run for well under a
millisecond (16k tokens, 8 heads x 64 on an H200). Captured once with
``torch.cuda.make_graphed_callables``, the forward and the backward become one replay each.

A graph is captured for a fixed key (shapes, strides, dtype, per-head budgets, predictor
storage) once it has been met STABLE_CALLS times in a row, so budgets that still anneal are
not captured at every change; a new key drops the old graph. A dropped graph's memory pool is
freed only when the cyclic garbage collector runs (the autograd Function class that
make_graphed_callables builds around it is a reference cycle), so every COLLECT_EVERY drops a
collection is forced: before, re-captures after each profile kept dozens of GiB of dead pools
alive in a 1000-step run, until it ran out of memory. The predictor's weights are read
inside the graph from their (in-place updated) parameters, so its fine-tuning needs no
recapture. Graph inputs, outputs and saved tensors are static buffers: a second forward before
the backward of the first would overwrite them, so while a replayed forward waits for its
backward (several micro-batches in flight, activation recomputation) calls run eagerly. Only
problems of at most MAX_ELEMENTS query elements are graphed: their static buffers are small,
and longer sequences are bound by the kernels, where a replay saves nothing.
"""

from __future__ import annotations

import gc
from typing import Callable, Optional

import torch

from .on_backward import OnBackward

MAX_ELEMENTS = 1 << 25   # q elements (s x b x heads x d): 16k tokens x batch 2 x 8 heads x 64 is 1 << 24
STABLE_CALLS = 3
COLLECT_EVERY = 8   # dropped graphs (all layers) between forced garbage collections

_dropped = 0


def _drop() -> None:
    global _dropped
    _dropped += 1
    if _dropped >= COLLECT_EVERY:
        _dropped = 0
        gc.collect()


class GraphedSparseAttention:
    def __init__(self):
        self._key = None
        self._seen = 0
        self._graphed: Optional[Callable] = None
        self.in_flight = False

    @staticmethod
    def fits(q: torch.Tensor) -> bool:
        return q.is_cuda and q.numel() <= MAX_ELEMENTS

    def __call__(self, key: tuple, fn: Callable, q, k, v) -> torch.Tensor:
        """fn(q, k, v) -> out, replayed from graphs once `key` is stable; eagerly otherwise."""
        if key != self._key:
            dropped = self._graphed is not None
            self._key, self._seen, self._graphed = key, 0, None
            if dropped:
                _drop()
        self._seen += 1
        if self.in_flight or (self._graphed is None and self._seen < STABLE_CALLS):
            return fn(q, k, v)
        if self._graphed is None:
            samples = tuple(t.detach().clone().requires_grad_(True) for t in (q, k, v))
            self._graphed = torch.cuda.make_graphed_callables(fn, samples)
        self.in_flight = True
        return OnBackward.apply(self._graphed(q, k, v), self._landed)

    def _landed(self) -> None:
        """The replayed forward's backward has come: the graphs may replay again."""
        self.in_flight = False
