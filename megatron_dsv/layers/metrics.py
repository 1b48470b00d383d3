"""What DSV reports: per-layer stage, sparsity, budgets, predictor loss, recall and timings.

``dsv_metrics(model)`` returns a dict; ``log_dsv_metrics`` writes its scalars to a
TensorBoard ``SummaryWriter`` or a W&B run (Megatron's ``get_tensorboard_writer()`` /
``get_wandb_writer()``); ``append_jsonl`` keeps the full per-head record for
``python -m megatron_dsv.plot``.
"""

from __future__ import annotations

import json
import os
from typing import List

from .attention import DSVDotProductAttention
from .controller import PER_HEAD_BUFFERS


def _mean(values):
    vals = [v for v in values if v is not None and v == v]   # (v == v: not NaN)
    return sum(vals) / len(vals) if vals else float("nan")


def dsv_layers(model) -> List[DSVDotProductAttention]:
    """The DSV core-attention modules of a module or a list of model chunks. A list of the layers
    themselves is returned as it is: a training loop finds them once and passes them every step
    (walking a model's modules is host time the GPU waits for: ~40 us for `small`'s layers alone)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    if all(isinstance(chunk, DSVDotProductAttention) for chunk in chunks):
        return list(chunks)
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, DSVDotProductAttention)]


def dsv_metrics(model) -> dict:
    """{"layers": [per-layer dict, ...], "summary": {...}} over every DSV layer of `model`
    (a module or a list of model chunks). Reading it resolves pending CUDA timing events."""
    layers = [m.metrics() for m in dsv_layers(model)]
    summary = {
        "stage": min((l["stage"] for l in layers), default=0),
        "sparse_layers": sum(l["sparse"] for l in layers),
        "layers": len(layers),
        **{name: _mean(_mean(l[name]) for l in layers) for name in PER_HEAD_BUFFERS},
        "predictor_loss": _mean(l["predictor_loss"] for l in layers),
        # Mass the budgets hold by the profiled curves, and the share of (query, KV) blocks computed
        # (a layer running dense counts 1).
        "held_mass": _mean(_mean(l["held_mass"]) for l in layers),
        "density": _mean((_mean(l["budget"]) if l["sparse"] else 1.0) for l in layers),
        "selection_ms": sum(l.get("selection_ms", 0.0) for l in layers),
        "attention_ms": sum(l.get("attention_ms", 0.0) for l in layers),
    }
    return {"layers": layers, "summary": summary}


def log_dsv_metrics(metrics: dict, writer, step: int) -> None:
    """Write summary and per-layer scalars (mean over heads) to a TensorBoard writer or W&B run."""
    scalars = {f"dsv/{k}": v for k, v in metrics["summary"].items()}
    # Tag by position: recipes such as Flux number several block types from 0 each.
    for pos, layer in enumerate(metrics["layers"]):
        tag = f"dsv/layer{pos:02d}"
        scalars[f"{tag}/stage"] = layer["stage"]
        scalars[f"{tag}/predictor_loss"] = layer["predictor_loss"]
        for key in (*PER_HEAD_BUFFERS, "budget", "held_mass"):
            scalars[f"{tag}/{key}"] = _mean(layer[key])
    if hasattr(writer, "add_scalar"):
        for key, val in scalars.items():
            writer.add_scalar(key, val, step)
    elif hasattr(writer, "log"):
        writer.log(scalars, step=step)
    else:
        raise ValueError(f"writer must be a TensorBoard SummaryWriter or a W&B run, got {type(writer).__name__}")


def append_jsonl(path: str, metrics: dict, step: int) -> None:
    """Append one {"step": ..., **metrics} record (per-head lists included) to a JSON-lines log. A log whose
    last line a killed run left cut short gets a line break first, so a resumed run's records stay whole."""
    with open(path, "a+b") as f:   # (opened at the end; writes go there whatever is read)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps({"step": step, **metrics}) + "\n").encode())
