"""What a caller that captures a whole training step in a CUDA graph (or traces it whole with
torch.compile(fullgraph=True)) needs from the DSV layers.

A small model's step is bound by host time: at 16k tokens the GPU work of a stage-2 step is about
half of the step's Python and launches (bench/step.py). Capturing the forward and backward once
and replaying them removes that host time for every layer, dense or DSV. A replay runs the kernels
the capture launched and none of the layers' Python, so

- the decisions the layers made at capture (stage, sparse or dense, the width k_max of the block
  lists) are frozen into the graph: `replay_key(model)` fixes them for the next training step
  (DSVDotProductAttention.plan_step) and returns them, and a graph captured under key K may
  replay any step whose key is K. The per-head budgets are not frozen: the selection reads them
  from a tensor on the device that replay_key updates in place (device_budgets.py), so a graph
  replays across the anneal's levels and the profiles' budget changes of equal k_max. It is None
  where the next step cannot be replayed (a step that profiles; a layer that has not run; packed
  clips; context parallelism), which then runs eagerly. A step that trains the predictor (stage
  1) replays too: its loss and gradients are computed in the graph, on sampled rows that follow
  the device's step counter, and applied after the replay. The key is read at the shape each layer last ran,
  evaluation included: a caller adds its input shapes to its own key (the example does), and an
  evaluation at another shape changes the key until a training step runs again;
- the capture and its warm-up run inside `capturing(model)`, which fixes each layer's decisions for
  the step on entry (plan_step): the forward reads no host state, so torch.compile traces a stage-2
  step whole, with no guard on the step counter. The layers launch plain kernels (no
  CUDA graphs of their own, no timing events while capturing, the predictor's weights cast inside
  the graph so that fine-tuning them in place needs no recapture); a training step's predictor
  loss and gradients are computed but not applied, since neither is a training step;
- after each replay, `replayed(model)` does that bookkeeping (the predictor's Adam step from the
  replay's gradients, each layer counts the step, which may start an anneal or a profile: the
  next key says so).

Forward timings (dsv_metrics' selection_ms / attention_ms) cover eager steps only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from .metrics import dsv_layers


def replay_key(model) -> Optional[tuple]:
    """The decisions of every DSV layer at the next training step (at the shapes they last ran), or
    None where that step must run eagerly. () for a model without DSV layers."""
    keys = tuple(layer.plan_step() for layer in dsv_layers(model))
    return None if any(k is None for k in keys) else keys


@contextmanager
def capturing(model) -> Iterator[None]:
    """Forwards and backwards inside run as a captured step must: see the module docstring."""
    layers = dsv_layers(model)
    for layer in layers:
        if layer.cp is not None:
            raise NotImplementedError("step capture: DSV layers under context parallelism plan and exchange per "
                                      "step on the host; run those steps eagerly")
        layer.commit()
        if layer.plan_step() is None:
            raise RuntimeError(f"step capture: DSV layer {layer.layer_number} cannot run its next step planned "
                               f"(a step that profiles, or a layer that has not run): step_graph.replay_key is "
                               f"None for it; run that step eagerly")
        layer.in_step_graph = True
        layer.graph_stats = None
    try:
        yield
    finally:
        for layer in layers:
            layer.in_step_graph = False
            layer.step_plan = None


def replayed(model) -> None:
    """The bookkeeping of one replayed training step: what each layer's backward would have staged (the
    predictor's loss and gradients the replay computed, in the graph's tensors) is committed."""
    for layer in dsv_layers(model):
        layer.replayed()
