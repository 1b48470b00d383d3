"""Megatron-Core's own CUDA graphs over a DSV layer's attention: refused when the layer is built.

Megatron captures a layer (cuda_graph_impl "local" over the whole layer, which any region but the MoE
router's or Mamba's makes it take; "transformer_engine" over the whole layer or its "attn" region) or a
whole iteration ("full_iteration") and replays it without running the modules' Python. A DSV layer
decides on the host, per step, its stage, sparse or dense, what the predictor trains on, and commits
that bookkeeping when the backward ends; replayed by Megatron, all of it would freeze at the capture (a
layer captured in stage 1 would stay dense for good), silently.
DSV replays its own work from CUDA graphs instead (DSVConfig.cuda_graphs), and a whole training step
through the protocol of megatron_dsv.layers.step_graph, which re-keys the graph when the decisions
change. Graphs that leave the attention out (Transformer Engine's of the MLP or MoE parts, the local
implementation's of the MoE router or a Mamba layer) are fine.
"""

from __future__ import annotations

from typing import Optional

# Regions of the "local" implementation that graph part of a layer's MLP or a Mamba layer only; any other
# region it is given ("attn", "mlp", "moe") makes it graph the whole layer (Megatron-Core 0.16 and 0.19
# alike), attention included. Transformer Engine's implementation graphs the attention for "attn" only.
_LOCAL_PARTIAL = ("moe_router", "moe_preprocess", "mamba")


def _names(values) -> list:
    """Megatron's capture regions as names: a list of enums (after TransformerConfig's __post_init__), a
    comma-separated string, or None / empty (the whole layer; "full" is its deprecated spelling)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = values.split(",")
    elif not isinstance(values, (list, tuple)):
        values = [values]
    return [n for n in (getattr(v, "name", str(v)) for v in values) if n and n != "full"]


def megatron_graphs_over_attention(config) -> Optional[str]:
    """A description of the training CUDA graphs Megatron would capture a layer's self-attention in under
    `config` (a TransformerConfig), or None where there are none. Megatron-Core 0.16 names the regions
    cuda_graph_scope (where "full_iteration" is one), 0.19 cuda_graph_modules (and has a cuda_graph_impl
    "full_iteration"); inference graphs are not training steps and are left alone."""
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
    names = _names(getattr(config, field, None))
    if impl == "local":
        if names and all(n in _LOCAL_PARTIAL for n in names):
            return None
        # 0.19: with the whole layer asked for and block-level inference graphs, the block owns the graphs
        # (inference only) and the layer gets no training graph.
        if not names and _names(getattr(config, "inference_cuda_graph_scope", None)) == ["block"]:
            return None
    elif names and "attn" not in names:
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
            "through megatron_dsv.layers.step_graph. Keep the attention out of Megatron's graphs "
            "(cuda_graph_impl='transformer_engine' with the MLP or MoE regions only; the local implementation "
            "graphs the whole layer for any region but the MoE router's), or cuda_graph_impl='none'")
