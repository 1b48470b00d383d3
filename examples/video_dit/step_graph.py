"""The training step's forward, loss and backward replayed from CUDA graphs.

A small DiT's step is bound by host time (Megatron's layers, the compiled tails, autograd),
dense or DSV: bench/step.py measures it. Captured once, the whole forward and backward is one
replay. The optimizer step stays eager (a few multi-tensor launches), so the learning rate may
change every step.

A graph is captured for a key (input shapes, and the DSV layers' decisions for the step, from
megatron_dsv.layers.step_graph.replay_key) at the STABLE_STEPS-th step with that key (the ones
before run eagerly), and replays every later step with that key. Up to MAX_GRAPHS graphs are held,
the least recently replayed dropped first: a plain step's and a profile step's (which computes
more: a key of its own), through stage 1 and again in stage 2. Where the number of sampled rows
changes with the step (query blocks not a multiple of DSVConfig.sample_stride) there are two of
each, and they recapture as they alternate (each graph holds its own gradients, so more graphs
would cost a copy of them each). A step whose key is None (a layer
that has not trained yet) runs eagerly. The key holds each DSV layer's k_max (the width of its block
lists, a power of two), not its budgets, which the graph reads from the device: budgets that move
(the target policy's anneal, a profile that shifts one) replay the same graph until k_max changes.
`replays` counts what was replayed.
The graphs share one memory pool, so holding a second one costs its static outputs, not a second
copy of the step's activations; the pool stays reserved during eager steps, so a step that runs
eagerly while a graph is held needs the captured step's activations on top of its own. Each
capture is preceded by one warm-up pass on a side stream, as torch.cuda.graph expects; neither
counts as a training step (step_graph.capturing), and each replay does the DSV bookkeeping of one
(step_graph.replayed). Gradients come out in static buffers that the next replay (of any of the
graphs: they share memory) overwrites: they are handed to the parameters' .grad after the replay,
for the caller's optimizer to consume before the next step.
"""

from __future__ import annotations

import gc
from collections import Counter, OrderedDict
from typing import List, NamedTuple

import torch

from megatron_dsv.layers import dsv_layers
from megatron_dsv.layers.step_graph import CapturedStep, capturing, replay_key, replayed

from .flow import flow_matching_loss

STABLE_STEPS = 3
MAX_GRAPHS = 2   # a plain step's and a profile step's


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: List[torch.Tensor]      # static x0, caption, t, noise
    grads: List[torch.Tensor]       # static gradients of the parameters
    loss: torch.Tensor              # static loss
    dsv: CapturedStep               # what the DSV layers computed for their bookkeeping


class CapturedTrainStep:
    def __init__(self, model: torch.nn.Module, params: List[torch.nn.Parameter]):
        self.model, self.params = model, params
        # Found once: replay_key, capturing and replayed take them as they take a model, and walking the
        # model's modules three times a step is host time before and after every replay.
        self.layers = dsv_layers(model)
        self.graphs: "OrderedDict[tuple, _Captured]" = OrderedDict()   # least recently replayed first
        self.seen = Counter()   # eager steps of each key not captured yet
        self.pool = None        # the graphs' shared memory pool
        self.replays = 0   # steps replayed so far (the example's closing line reports it)

    def __call__(self, x0, caption, t, noise) -> torch.Tensor:
        """loss of one step, with the parameters' .grad set (they must hold none on entry: a replay
        writes its gradients, it does not add them)."""
        if any(p.grad is not None for p in self.params):
            raise RuntimeError("CapturedTrainStep: parameters hold gradients on entry; a replayed step would "
                               "overwrite them (gradient accumulation over micro-batches is not supported)")
        key = replay_key(self.layers)
        key = None if key is None else (tuple(x0.shape), tuple(caption.shape), key)
        captured = self.graphs.get(key)
        if captured is None and key is not None:
            self.seen[key] += 1
            if self.seen[key] >= STABLE_STEPS:
                del self.seen[key]
                captured = self._capture(key, x0, caption, t, noise)
        if captured is None:
            loss = flow_matching_loss(self.model, x0, caption, t=t, noise=noise)
            loss.backward()
            # Detached: a caller holding this loss until the next step would otherwise keep its autograd
            # graph alive, and with it the parameters' gradient accumulators. A capture reuses live
            # accumulators, which belong to the stream of the eager forward that made them (the legacy
            # default stream), and its backward then syncs that stream with the capturing one, which CUDA
            # refuses (cudaErrorStreamCaptureImplicit).
            return loss.detach()
        self.graphs.move_to_end(key)
        for buf, value in zip(captured.inputs, (x0, caption, t, noise)):
            buf.copy_(value)
        captured.graph.replay()
        for p, g in zip(self.params, captured.grads):
            p.grad = g
        replayed(self.layers, captured.dsv)
        self.replays += 1
        return captured.loss.clone()   # the static loss: the next replay of any graph may overwrite it

    def _capture(self, key, *inputs) -> _Captured:
        while len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
            gc.collect()   # its static outputs go back to the pool
        inputs = [t.detach().clone() for t in inputs]
        for p in self.params:
            p.grad = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with capturing(self.layers, warm_up=True), torch.cuda.stream(side):
            flow_matching_loss(self.model, *inputs[:2], t=inputs[2], noise=inputs[3]).backward()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = None
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with capturing(self.layers) as dsv, torch.cuda.graph(graph, pool=self.pool):
                loss = flow_matching_loss(self.model, *inputs[:2], t=inputs[2], noise=inputs[3])
                loss.backward()
        except RuntimeError as exc:  # torch.AcceleratorError is one
            raise RuntimeError(f"CapturedTrainStep: capturing the training step as one CUDA graph failed "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0]}); train without "
                               f"--cuda-graph-step") from exc
        captured = _Captured(graph, inputs, [p.grad for p in self.params], loss, dsv)   # only a complete capture
        for p in self.params:
            p.grad = None
        self.graphs[key] = captured
        return captured
