"""Megatron-Core's own CUDA graphs over a DSV layer's attention: refused when the layer is built.

Megatron captures a layer (cuda_graph_impl "local" or "transformer_engine", over the whole layer or
its "attn" region) or a whole iteration ("full_iteration") and replays it without running
the modules' Python. A DSV layer decides on the host, per step, its stage, sparse or dense, what the
predictor trains on, and commits that bookkeeping when the backward ends; replayed by Megatron, all of
it would freeze at the capture (a layer captured in stage 1 would stay dense for good), silently.
DSV replays its own work from CUDA graphs instead (DSVConfig.cuda_graphs), and a whole training step
through the protocol of megatron_dsv.layers.step_graph, which re-keys the graph when the decisions
change. Graphs of the MLP or MoE parts alone leave the attention out and are fine.
"""

from __future__ import annotations

from typing import Optional

_WHOLE_LAYER = ("full",)          # the deprecated spelling of the whole layer, before __post_init__
_COVERING = ("attn", "full_iteration")


def _module_names(modules) -> list:
    """Megatron's per-layer capture regions as names: a list of enums (after TransformerConfig's
    __post_init__), a comma-separated string, or None / empty (the whole layer)."""
    if modules is None:
        return []
    if isinstance(modules, str):
        return [s for s in modules.split(",") if s]
    if not isinstance(modules, (list, tuple)):
        modules = [modules]
    return [getattr(s, "name", str(s)) for s in modules]


def megatron_graphs_over_attention(config) -> Optional[str]:
    """A description of the training CUDA graphs Megatron would capture a layer's self-attention in under
    `config` (a TransformerConfig), or None where there are none. Megatron-Core 0.16 names the per-layer
    regions cuda_graph_scope (where "full_iteration" is one), 0.19 cuda_graph_modules (and has a
    cuda_graph_impl "full_iteration"); inference graphs are not training steps and are left alone."""
    impl = getattr(config, "cuda_graph_impl", "none") or "none"
    if getattr(config, "enable_cuda_graph", False):   # deprecated spellings (converted by __post_init__)
        impl = "local"
    elif getattr(config, "external_cuda_graph", False):
        impl = "transformer_engine"
    if impl == "none":
        return None
    if impl == "full_iteration":
        return "cuda_graph_impl='full_iteration'"
    field = "cuda_graph_modules" if hasattr(config, "cuda_graph_modules") else "cuda_graph_scope"
    names = _module_names(getattr(config, field, None))
    if names and not any(n in _COVERING + _WHOLE_LAYER for n in names):
        return None
    return f"cuda_graph_impl={impl!r}, {field}={names or 'the whole layer'}"


def check_megatron_cuda_graphs(config, name: str) -> None:
    """Raise NotImplementedError where Megatron's CUDA graphs would capture this layer's attention."""
    graphs = megatron_graphs_over_attention(config)
    if graphs is not None:
        raise NotImplementedError(
            f"{name}: Megatron's CUDA graphs ({graphs}) would capture this layer's attention and replay it "
            "without its Python, freezing its stage, its sparse-or-dense decision and the predictor's "
            "bookkeeping at the capture. DSV replays its own selection, sparse attention and predictor "
            "training from CUDA graphs (DSVConfig.cuda_graphs, on by default), and a whole training step "
            "through megatron_dsv.layers.step_graph. Keep the attention out of Megatron's graphs: "
            "graphs of the MLP or MoE parts only (cuda_graph_modules, cuda_graph_scope before Megatron-Core 0.19), "
            "or cuda_graph_impl='none'")
