"""Turn DSV on in a Megatron-Core ModuleSpec tree.

``apply_dsv(spec, cfg)`` returns a copy of any spec (a layer, a block, a model's layer
list; GPT, DiT with adaLN, WAN-style custom slots) in which the ``core_attention`` of
every self-attention is ``DSVDotProductAttention``. A spec counts as self-attention when
its module is Megatron's ``SelfAttention`` (or a class whose name contains
"SelfAttention") or when it fills a slot whose name contains "self_attention" (e.g.
WAN's ``full_self_attention``). Cross-attention and factorised attention (slots named
``spatial_*`` / ``temporal_*``, as in STDiT) are never touched.
"""

from __future__ import annotations

import copy
import dataclasses

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from ..config import DSVConfig
from .attention import DSVDotProductAttention


def _module_name(module) -> str:
    if isinstance(module, tuple):  # (import path, class name)
        return module[-1]
    return getattr(module, "__name__", type(module).__name__)


def _is_self_attention(spec: ModuleSpec, slot: str) -> bool:
    name = _module_name(spec.module)
    slot = slot.lower()
    # Factorised attention (STDiT's spatial_/temporal_self_attention) attends within one frame or
    # along one pixel's time axis: short sequences that are not 3D cubes, so it stays dense.
    if "cross" in slot or "Cross" in name or slot.startswith(("spatial_", "temporal_")):
        return False
    return "SelfAttention" in name or "self_attention" in slot


def _dsv_core_attention(cfg: DSVConfig) -> ModuleSpec:
    return ModuleSpec(module=DSVDotProductAttention, params={"dsv_config": cfg})


def _walk(node, cfg: DSVConfig, slot: str, counter: list):
    if isinstance(node, ModuleSpec):
        new = copy.copy(node)
        new.params = dict(node.params)
        sub = node.submodules
        if _is_self_attention(node, slot) and sub is not None and hasattr(sub, "core_attention"):
            sub = dataclasses.replace(sub, core_attention=_dsv_core_attention(cfg))
            counter[0] += 1
        new.submodules = _walk(sub, cfg, slot, counter) if sub is not None else None
        return new
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {f.name: _walk(getattr(node, f.name), cfg, f.name, counter)
                   for f in dataclasses.fields(node) if f.init}
        return dataclasses.replace(node, **changes)
    if isinstance(node, (list, tuple)):
        return type(node)(_walk(x, cfg, slot, counter) for x in node)
    if isinstance(node, dict):
        return {key: _walk(val, cfg, str(key), counter) for key, val in node.items()}
    return node


def apply_dsv(spec, dsv_config: DSVConfig, *, require: bool = True):
    """A copy of `spec` with every self-attention's core_attention replaced by DSV.

    Raises ValueError if no self-attention was found (unless require=False), so a spec
    that hides its attention somewhere unexpected fails loudly instead of training dense.
    """
    if not isinstance(dsv_config, DSVConfig):
        raise ValueError(f"dsv_config must be a DSVConfig, got {type(dsv_config).__name__}")
    counter = [0]
    new = _walk(spec, dsv_config, "", counter)
    if require and counter[0] == 0:
        raise ValueError(
            "apply_dsv found no self-attention with a core_attention slot in the spec; "
            "see megatron_dsv.layers.spec for how self-attention is recognised"
        )
    return new


def get_dsv_layer_spec(dsv_config: DSVConfig, *, qk_layernorm: bool = False) -> ModuleSpec:
    """A fresh transformer-layer spec (bidirectional self-attention + MLP) with DSV attention.

    Uses Transformer Engine's fused modules when TE is importable, else Megatron's local ones.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    try:
        import transformer_engine  # noqa: F401
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    except ImportError:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm)
    spec = apply_dsv(spec, dsv_config)
    attn = spec.submodules.self_attention  # a copy made by apply_dsv: safe to edit
    attn.params["attn_mask_type"] = AttnMaskType.no_mask
    return spec
