"""The training step's forward, loss and backward replayed from one CUDA graph.

A small DiT's step is bound by host time (Megatron's layers, the compiled tails, autograd),
dense or DSV: bench/step.py measures it. Captured once, the whole forward and backward is one
replay. The optimizer step stays eager (a few multi-tensor launches), so the learning rate may
change every step.

A graph is captured for a key (input shapes, and the DSV layers' decisions for the step, from
megatron_dsv.layers.step_graph.replay_key) at the STABLE_STEPS-th step with that key (the ones
before run eagerly), and replays every later step with that key; a step whose key is None (a step
that profiles) runs eagerly and keeps the graph, and a new key captures anew. The key holds
each DSV layer's k_max (the width of its block lists, a power of two), not its budgets, which
the graph reads from the device: budgets that move (the target policy's anneal, a profile that
shifts one) replay the same graph until k_max changes. `replays` counts what was replayed.
The graph's memory pool stays reserved during eager steps, so a step that runs eagerly while a
graph is held needs the captured step's activations on top of its own. The capture is preceded by
one warm-up pass on a side stream, as torch.cuda.graph expects; neither counts as a training step
(step_graph.capturing), and each replay does the DSV bookkeeping of one (step_graph.replayed).
Gradients come out in static buffers that each replay overwrites: they are handed to the
parameters' .grad after the replay, for the caller's optimizer to consume before the next step.
"""

from __future__ import annotations

import gc
from typing import List, Optional

import torch

from megatron_dsv.layers.step_graph import capturing, replay_key, replayed

from .flow import flow_matching_loss

STABLE_STEPS = 3


class CapturedTrainStep:
    def __init__(self, model: torch.nn.Module, params: List[torch.nn.Parameter]):
        self.model, self.params = model, params
        self.key = None
        self.seen = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.replays = 0   # steps replayed so far (the example's closing line reports it)

    def __call__(self, x0, caption, t, noise) -> torch.Tensor:
        """loss of one step, with the parameters' .grad set (they must hold none on entry: a replay
        writes its gradients, it does not add them)."""
        if any(p.grad is not None for p in self.params):
            raise RuntimeError("CapturedTrainStep: parameters hold gradients on entry; a replayed step would "
                               "overwrite them (gradient accumulation over micro-batches is not supported)")
        key = replay_key(self.model)
        key = None if key is None else (tuple(x0.shape), tuple(caption.shape), key)
        if key is not None and key != self.key:
            self.key, self.seen = key, 0
            if self.graph is not None:
                self.graph = self.inputs = self.grads = self.loss = None
                gc.collect()   # the old graph's private memory pool goes with it
        self.seen += key is not None
        if key is None or (self.graph is None and self.seen < STABLE_STEPS):
            loss = flow_matching_loss(self.model, x0, caption, t=t, noise=noise)
            loss.backward()
            # Detached: a caller holding this loss until the next step would otherwise keep its autograd
            # graph alive, and with it the parameters' gradient accumulators. A capture reuses live
            # accumulators, which belong to the stream of the eager forward that made them (the legacy
            # default stream), and its backward then syncs that stream with the capturing one, which CUDA
            # refuses (cudaErrorStreamCaptureImplicit).
            return loss.detach()
        if self.graph is None:
            self._capture(x0, caption, t, noise)
        for buf, value in zip(self.inputs, (x0, caption, t, noise)):
            buf.copy_(value)
        self.graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        replayed(self.model)
        self.replays += 1
        return self.loss

    def _capture(self, *inputs) -> None:
        self.inputs = [t.detach().clone() for t in inputs]
        for p in self.params:
            p.grad = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with capturing(self.model), torch.cuda.stream(side):
            flow_matching_loss(self.model, *self.inputs[:2], t=self.inputs[2], noise=self.inputs[3]).backward()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        try:
            with capturing(self.model), torch.cuda.graph(graph):
                self.loss = flow_matching_loss(self.model, *self.inputs[:2], t=self.inputs[2], noise=self.inputs[3])
                self.loss.backward()
        except RuntimeError as exc:  # torch.AcceleratorError is one
            raise RuntimeError(f"CapturedTrainStep: capturing the training step as one CUDA graph failed "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0]}); train without "
                               f"--cuda-graph-step") from exc
        self.graph = graph   # only a complete capture is kept
        self.grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
