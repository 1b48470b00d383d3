"""What a caller that captures a whole training step in a CUDA graph (or traces it whole with
torch.compile(fullgraph=True)) needs from the DSV layers.

A small model's step is bound by host time: at 16k tokens the GPU work of a stage-2 step is about
half of the step's Python and launches (bench/step.py). Capturing the forward and backward once
and replaying them removes that host time for every layer, dense or DSV. A replay runs the kernels
the capture launched and none of the layers' Python, so

- the decisions the layers made at capture (stage, per-head budgets, sparse or dense) are frozen
  into the graph: `replay_key(model)` gives them, as the layers will make them at the next
  training step, and a graph captured under key K may replay any step whose key is K; it is None
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

from .attention import DSVDotProductAttention
from .metrics import dsv_layers


def _layer_key(layer: DSVDotProductAttention) -> Optional[tuple]:
    ctl, n_kv = layer.controller, layer.last_n_kv
    if layer.cp is not None or n_kv is None or layer.last_packed:
        return None
    if ctl.profile_now():
        return None
    # A step that trains the predictor samples a number of rows that may differ from step to step (their
    # values follow the device's step counter).
    learns = layer.next_sample_size() if ctl.learns_now() else None
    if not ctl.may_run_sparse():   # dense attention (stage 1): the budgets play no part in the step
        return n_kv, ctl.host()["stage"], False, learns
    # The sparse-or-dense choice is a function of these at a shape the layer has already run
    # (dispatch measures once per shape), so it needs no place in the key.
    return n_kv, ctl.host()["stage"], True, learns, tuple(ctl.budgets(n_kv))


def replay_key(model) -> Optional[tuple]:
    """The decisions of every DSV layer at the next training step (at the shapes they last ran), or
    None where that step must run eagerly. () for a model without DSV layers."""
    keys = tuple(_layer_key(layer) for layer in dsv_layers(model))
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
        layer.plan_step()
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
