"""The predictor's training work of one layer at an eager stage-1 step, replayed from a CUDA graph.

In stage 1 a layer runs dense attention and, in its backward, trains the predictor on sampled query
rows (LowRankPredictor.gram_loss): a Gram product over the keys and a few dozen small launches with
their Python, ~0.06 ms of GPU time per layer at 16k tokens but several times that in host time.
Replayed from a graph, the work costs two input copies and one launch: for `small`'s 8 layers 6-13 ms
less host time per eager step (bench/eager_ab.py), which makes a step bound by host time (16k tokens
x batch 1) 5% faster; at batch 2 the GPU's ~100 ms of work hides most of it.

Only the plain training step is graphed: the same shapes every step, all heads, no packed clips and
no profile (a profile step, one in profile_interval_stage1, runs eagerly). The sampled rows follow
the controller's step counter on the device, and the predictor's weights are read from their
parameters, updated in place (by the graph itself, where it holds the Adam step), so neither needs a
recapture. A graph is captured for a key once it has been met STABLE_CALLS times; that call's work is
the capture's warm-up (a graph that updates the predictor must not also be replayed then); up to
MAX_GRAPHS keys keep theirs, since a sequence whose query blocks are not a multiple of the sample
stride alternates between two sample plans. Its outputs are static tensors: the layer consumes them
before the next replay. The layer releases the graphs once they can no longer replay (stage 2, or a
whole step captured).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict

import torch

from .graphed import STABLE_CALLS, GraphedSparseAttention

MAX_GRAPHS = 4


class GraphedUpkeep:
    def __init__(self):
        self._seen: Dict[tuple, int] = {}
        self._graphs: "OrderedDict[tuple, tuple]" = OrderedDict()   # key -> (static inputs, graph, outputs)

    @staticmethod
    def fits(q: torch.Tensor) -> bool:
        """The sizes graphed.py replays, outside any other capture (one graph cannot be captured inside another)."""
        return GraphedSparseAttention.fits(q) and not torch.cuda.is_current_stream_capturing()

    def __call__(self, key: tuple, fn: Callable[..., dict], q: torch.Tensor, k: torch.Tensor) -> dict:
        """fn(q, k) -> {name: tensor}, replayed from a graph once `key` has been met STABLE_CALLS times;
        eagerly before. fn's side effects on the device (in-place updates) happen once per call."""
        if key not in self._graphs:
            if len(self._seen) > 16 * MAX_GRAPHS:   # keys met once or twice (other shapes) are not kept for good
                self._seen.clear()
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < STABLE_CALLS:
                return fn(q, k)
            del self._seen[key]
            out, self._graphs[key] = self._capture(fn, q, k)
            if len(self._graphs) > MAX_GRAPHS:   # (a plain CUDAGraph holds no reference cycle: dropping it frees its pool)
                self._graphs.popitem(last=False)
            return out
        self._graphs.move_to_end(key)
        inputs, graph, out = self._graphs[key]
        for static, t in zip(inputs, (q, k)):
            static.copy_(t)
        graph.replay()
        return dict(out)

    def release(self) -> None:
        """Free every graph and its memory (static inputs, pool)."""
        self._graphs.clear()
        self._seen.clear()

    @staticmethod
    def _capture(fn, q, k) -> tuple:
        """(fn(q, k) run as the capture's warm-up, (static inputs, graph, static outputs))."""
        # Same strides as the inputs (e.g. slices of a fused QKV projection), so the capture takes the path
        # an eager call takes on them (key_gram's parts) and gives its results bit for bit. A slice keeps
        # its projection's footprint (3x for a slice of a fused QKV); rotary embeddings leave q and k packed.
        inputs = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                       for t in (q, k))
        # A warm-up on the capture's stream first: libraries set up per-stream state (cuBLAS workspaces) there.
        # It is this call's work; its outputs are handed on as copies made on the current stream, whose
        # memory the allocator orders as any eager call's.
        current, stream = torch.cuda.current_stream(q.device), torch.cuda.Stream(q.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            warm = fn(*inputs)
        current.wait_stream(stream)
        out = {name: t.clone() for name, t in warm.items()}
        del warm
        graph = torch.cuda.CUDAGraph()
        # thread_local: the capture runs on the autograd engine's thread, while the thread that called
        # backward() waits.
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            static = fn(*inputs)
        return out, (inputs, graph, static)
