"""What a caller that captures a whole training step in a CUDA graph (or traces it whole with
torch.compile(fullgraph=True)) needs from the DSV layers.

A small model's step is bound by host time: at 16k tokens the GPU work of a stage-2 step is about
half of the step's Python and launches (bench/step.py). Capturing the forward and backward once
and replaying them removes that host time for every layer, dense or DSV. A replay runs the kernels
the capture launched and none of the layers' Python, so

- the decisions the layers made at capture (stage, sparse or dense, whether the step trains the
  predictor or profiles, the width k_max of the block lists) are frozen into the graph:
  `replay_key(model)` fixes them for the next training step (DSVDotProductAttention.plan_step)
  and returns them, and a graph captured under key K may replay any step whose key is K. The
  per-head budgets are not frozen: the selection reads them from a tensor on the device that
  replay_key updates in place (device_budgets.py), so a graph replays across the anneal's levels
  and the profiles' budget changes of equal k_max. It is None where the next step cannot be
  replayed (a layer that has not trained yet; packed clips; context parallelism), which then runs
  eagerly. Steps that train the predictor or profile replay too: the predictor's loss, gradients
  and (a layer that ran dense) Adam step and the profile's statistics are computed in the graph, on
  sampled rows that follow the device's step counter; the loss and the profile are recorded, and a
  sparse layer's Adam step taken, after the replay. A profile step has a key of its own (it
  computes more), so a caller holds a graph for the plain steps and one for the profiles. The key
  is read at the shape of each layer's last training step (evaluations, at any shape, do not
  change it); a caller adds its input shapes to its own key (the example does);
- the capture and its warm-up run inside `capturing(model)` (the warm-up with warm_up=True), which
  fixes each layer's decisions for the step on entry (plan_step): the forward reads no host state,
  so torch.compile traces a stage-2 step whole, with no guard on the step counter. The layers
  launch plain kernels (no
  CUDA graphs of their own, no timing events while capturing, the predictor's weights cast inside
  the graph so that training them in place needs no recapture); what the step computes for the
  bookkeeping (predictor loss, profile) is not recorded, since neither is a training step, but kept
  in the CapturedStep that capturing() yields: the graph's tensors, which each replay refreshes.
  A dense layer's Adam step is part of the captured step; the warm-up pass, run inside
  `capturing(model, warm_up=True)`, leaves it out, so the predictor trains once per replay;
- after each replay, `replayed(model, captured)` does that bookkeeping from them (the predictor
  loss's EMA, a sparse layer's Adam step, the profile's statistics, each layer counts the step,
  which may start an anneal or a profile: the next key says so).

Forward timings (dsv_metrics' selection_ms / attention_ms) cover eager steps only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional

from . import upkeep_stream
from .metrics import dsv_layers


def replay_key(model) -> Optional[tuple]:
    """The decisions of every DSV layer at the next training step (at the shapes they last trained), or
    None where that step must run eagerly. () for a model without DSV layers."""
    keys = tuple(layer.plan_step() for layer in dsv_layers(model))
    return None if any(k is None for k in keys) else keys


class CapturedStep:
    """What the DSV layers of one captured step compute for their bookkeeping: per layer, the predictor's
    loss (and a sparse layer's gradients) and the profile (the graph's tensors, refreshed by each replay),
    or None."""

    def __init__(self, layers):
        self.layers = layers
        self.stats: List[Optional[dict]] = [None] * len(layers)


@contextmanager
def capturing(model, warm_up: bool = False) -> Iterator[CapturedStep]:
    """Forwards and backwards inside run as a captured step must (see the module docstring); yields the
    CapturedStep that replayed() takes. warm_up: a pass run before the capture (on its stream, as
    torch.cuda.graph expects), which leaves the predictors as they are."""
    layers = dsv_layers(model)
    upkeep_stream.join_all()   # the capture must not wait on upkeep forked outside it
    for layer in layers:
        if layer.cp is not None:
            raise NotImplementedError("step capture: DSV layers under context parallelism plan and exchange per "
                                      "step on the host; run those steps eagerly")
        layer.commit()
        if layer.plan_step() is None:
            raise RuntimeError(f"step capture: DSV layer {layer.layer_number} cannot run its next step planned "
                               f"(a layer that has not trained yet, packed clips): step_graph.replay_key is None for "
                               f"it; run that step eagerly")
        layer.in_step_graph, layer.warm_up_pass = True, warm_up
        layer.graph_stats = None
        layer.graphed_upkeep.release()   # the graphs of its eager steps' upkeep: captured steps replace them
    captured = CapturedStep(layers)
    try:
        yield captured
    finally:
        for i, layer in enumerate(layers):
            captured.stats[i], layer.graph_stats = layer.graph_stats, None
            layer.in_step_graph = layer.warm_up_pass = False
            layer.step_plan = None


def replayed(model, captured: CapturedStep) -> None:
    """The bookkeeping of one training step replayed from the graph `captured` was recorded with: what
    each layer's backward would have staged (its predictor loss, a sparse layer's predictor update, the
    profile) is committed."""
    layers = dsv_layers(model)
    if [id(layer) for layer in layers] != [id(layer) for layer in captured.layers]:
        raise ValueError("step_graph.replayed: the CapturedStep was recorded on another model's DSV layers")
    for layer, stats in zip(layers, captured.stats):
        layer.replayed(stats)
