"""apply_dsv on the layer-spec trees of the upstream video/image DiT recipes.

The trees below mirror, slot for slot, the spec functions of the released upstream code
(read from the packages; they cannot be imported here because they need CUDA and
Transformer Engine):

- Megatron-Bridge 0.6.2, ``megatron/bridge/diffusion/models/wan/wan_layer_spec.py``
  ``get_wan_block_with_transformer_engine_spec`` (same shape in NeMo DFM
  ``dfm/src/megatron/model/wan/wan_layer_spec.py``);
- Megatron-Bridge 0.6.2, ``.../diffusion/models/flux/flux_layer_spec.py``
  ``get_flux_double_transformer_engine_spec`` / ``get_flux_single_transformer_engine_spec``;
- NeMo DFM ``dfm/src/megatron/model/dit/dit_layer_spec.py``
  ``get_dit_adaln_block_with_transformer_engine_spec``;
- nemo_toolkit 2.7.3, ``nemo/collections/diffusion/models/dit/dit_layer_spec.py``:
  the DiT, "official" DiT and STDiT spec functions.

Upstream classes are stood in for by local classes of the same name and base class
(apply_dsv recognises modules by class name and slot name, so names matter).
tests/test_patches.py runs apply_dsv on the real upstream WAN spec as well.
"""

import dataclasses
from dataclasses import dataclass
from typing import Union

import pytest
import torch
import torch.nn as nn
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import (Attention, CrossAttention, CrossAttentionSubmodules,
                                                 SelfAttention, SelfAttentionSubmodules)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_dsv import DSVConfig
from megatron_dsv.layers import DSVDotProductAttention, apply_dsv

CFG = DSVConfig(rank=8, block_q=32, cube=(2, 4, 4), block_kv=32, sample_stride=4)


# ---------------------------------------------------------------- stand-ins for TE / upstream classes
class TEColumnParallelLinear: ...
class TERowParallelLinear: ...
class TENorm: ...
class TEDotProductAttention: ...
class RMSNorm(nn.Module): ...


class DiTSelfAttention(SelfAttention): ...        # bridge/DFM: models/common/dit_attention.py
class DiTCrossAttention(CrossAttention): ...      # idem
class FluxSingleAttention(SelfAttention): ...     # bridge: models/flux/flux_attention.py
class JointSelfAttention(Attention): ...          # idem: MMDiT joint text+image attention
class WanLayerWithAdaLN(TransformerLayer): ...
class DiTLayerWithAdaLN(TransformerLayer): ...
class STDiTLayerWithAdaLN(TransformerLayer): ...
class MMDiTLayer(TransformerLayer): ...
class FluxSingleTransformerBlock(TransformerLayer): ...


@dataclass
class DiTCrossAttentionSubmodules:
    linear_q: Union[ModuleSpec, type] = None
    linear_kv: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type] = None
    k_layernorm: Union[ModuleSpec, type] = None


@dataclass
class JointSelfAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    added_linear_qkv: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type] = None
    k_layernorm: Union[ModuleSpec, type] = None
    added_q_layernorm: Union[ModuleSpec, type] = None
    added_k_layernorm: Union[ModuleSpec, type] = None


@dataclass
class WanWithAdaLNSubmodules(TransformerLayerSubmodules):
    temporal_self_attention: Union[ModuleSpec, type] = IdentityOp
    full_self_attention: Union[ModuleSpec, type] = IdentityOp
    norm1: Union[ModuleSpec, type] = None
    norm3: Union[ModuleSpec, type] = None
    norm2: Union[ModuleSpec, type] = None


@dataclass
class DiTWithAdaLNSubmodules(TransformerLayerSubmodules):
    temporal_self_attention: Union[ModuleSpec, type] = IdentityOp
    full_self_attention: Union[ModuleSpec, type] = IdentityOp


@dataclass
class STDiTWithAdaLNSubmodules(TransformerLayerSubmodules):
    spatial_self_attention: Union[ModuleSpec, type] = IdentityOp
    temporal_self_attention: Union[ModuleSpec, type] = IdentityOp
    full_self_attention: Union[ModuleSpec, type] = IdentityOp


# ---------------------------------------------------------------- mirrored spec functions
def _te_mlp():
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=TEColumnParallelLinear,
                                                           linear_fc2=TERowParallelLinear))


def _self_attn(module, params, norm=TENorm):
    return ModuleSpec(module=module, params=params, submodules=SelfAttentionSubmodules(
        linear_qkv=TEColumnParallelLinear, core_attention=TEDotProductAttention,
        linear_proj=TERowParallelLinear, q_layernorm=norm, k_layernorm=norm))


def _dit_cross_attn(params, norm=TENorm):
    return ModuleSpec(module=DiTCrossAttention, params=params, submodules=DiTCrossAttentionSubmodules(
        linear_q=TEColumnParallelLinear, linear_kv=TEColumnParallelLinear,
        core_attention=TEDotProductAttention, linear_proj=TERowParallelLinear,
        q_layernorm=norm, k_layernorm=norm))


def _mcore_cross_attn(params):
    # nemo_toolkit's spec fills CrossAttentionSubmodules with q/k layernorms too (newer mcore has
    # those fields); megatron-core 0.16 has none, so the mirror leaves them out.
    return ModuleSpec(module=CrossAttention, params=params, submodules=CrossAttentionSubmodules(
        linear_q=TEColumnParallelLinear, linear_kv=TEColumnParallelLinear,
        core_attention=TEDotProductAttention, linear_proj=TERowParallelLinear))


def bridge_wan_spec():
    params = {"attn_mask_type": AttnMaskType.padding}
    return ModuleSpec(module=WanLayerWithAdaLN, submodules=WanWithAdaLNSubmodules(
        norm1=nn.LayerNorm, norm3=nn.LayerNorm, norm2=nn.LayerNorm,
        full_self_attention=_self_attn(DiTSelfAttention, params),
        cross_attention=_dit_cross_attn(params),
        mlp=_te_mlp()))


def bridge_flux_double_spec():
    return ModuleSpec(module=MMDiTLayer, submodules=TransformerLayerSubmodules(
        self_attention=ModuleSpec(
            module=JointSelfAttention, params={"attn_mask_type": AttnMaskType.no_mask},
            submodules=JointSelfAttentionSubmodules(
                q_layernorm=TENorm, k_layernorm=TENorm, added_q_layernorm=TENorm, added_k_layernorm=TENorm,
                linear_qkv=TEColumnParallelLinear, added_linear_qkv=TEColumnParallelLinear,
                core_attention=TEDotProductAttention, linear_proj=TERowParallelLinear)),
        mlp=_te_mlp()))


def bridge_flux_single_spec():
    return ModuleSpec(module=FluxSingleTransformerBlock, submodules=TransformerLayerSubmodules(
        self_attention=_self_attn(FluxSingleAttention, {"attn_mask_type": AttnMaskType.no_mask}),
        mlp=_te_mlp()))


def dfm_dit_spec():
    params = {"attn_mask_type": AttnMaskType.padding}
    return ModuleSpec(module=DiTLayerWithAdaLN, submodules=DiTWithAdaLNSubmodules(
        full_self_attention=_self_attn(DiTSelfAttention, params, norm=RMSNorm),
        cross_attention=_dit_cross_attn(params, norm=RMSNorm),
        mlp=_te_mlp()))


def nemo_dit_spec(attn_mask_type=AttnMaskType.padding):
    params = {"attn_mask_type": attn_mask_type}
    return ModuleSpec(module=DiTLayerWithAdaLN, submodules=DiTWithAdaLNSubmodules(
        full_self_attention=_self_attn(SelfAttention, params, norm=RMSNorm),
        cross_attention=_mcore_cross_attn(params),
        mlp=_te_mlp()))


def nemo_official_dit_spec():
    return ModuleSpec(module=DiTLayerWithAdaLN, submodules=DiTWithAdaLNSubmodules(
        full_self_attention=ModuleSpec(
            module=SelfAttention, params={"attn_mask_type": AttnMaskType.no_mask},
            submodules=SelfAttentionSubmodules(linear_qkv=TEColumnParallelLinear,
                                               core_attention=TEDotProductAttention,
                                               linear_proj=TERowParallelLinear)),
        mlp=_te_mlp()))


def nemo_stdit_spec():
    params = {"attn_mask_type": AttnMaskType.padding}
    return ModuleSpec(module=STDiTLayerWithAdaLN, submodules=STDiTWithAdaLNSubmodules(
        spatial_self_attention=_self_attn(SelfAttention, params),
        temporal_self_attention=_self_attn(SelfAttention, params),
        full_self_attention=_self_attn(SelfAttention, params),
        cross_attention=_mcore_cross_attn(params),
        mlp=_te_mlp()))


# ---------------------------------------------------------------- tree helpers
def _children(node):
    """(name, child) pairs of a spec-tree node, in the order apply_dsv walks them."""
    if isinstance(node, ModuleSpec):
        return [("params." + k, v) for k, v in node.params.items()] + [("submodules", node.submodules)]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    if isinstance(node, (list, tuple)):
        return [(str(i), x) for i, x in enumerate(node)]
    if isinstance(node, dict):
        return [(str(k), v) for k, v in node.items()]
    return []


def flatten(node, path="", out=None):
    """{path: leaf} of a spec tree; a ModuleSpec contributes its module under path + '.module'."""
    out = {} if out is None else out
    if isinstance(node, ModuleSpec):
        out[path + ".module"] = node.module
    kids = _children(node)
    if not kids and not isinstance(node, ModuleSpec):
        out[path] = node
    for name, child in kids:
        flatten(child, f"{path}.{name}" if path else name, out)
    return out


def core_attention_paths(spec):
    """Paths of every core_attention slot (the slot itself, not what fills it)."""
    return sorted({p.split(".core_attention")[0] + ".core_attention"
                   for p in flatten(spec) if ".core_attention" in p})


def outside_core_attention(spec):
    return {p: v for p, v in flatten(spec).items() if ".core_attention" not in p}


def slot(spec, path):
    node = spec
    for name in path.split("."):
        node = node.submodules if name == "submodules" else getattr(node, name)
    return node


CASES = {
    # name: (mirrored spec, core_attention slots that must become DSV)
    "bridge-wan": (bridge_wan_spec, ["submodules.full_self_attention.submodules.core_attention"]),
    "bridge-flux-double": (bridge_flux_double_spec, ["submodules.self_attention.submodules.core_attention"]),
    "bridge-flux-single": (bridge_flux_single_spec, ["submodules.self_attention.submodules.core_attention"]),
    "dfm-dit": (dfm_dit_spec, ["submodules.full_self_attention.submodules.core_attention"]),
    "nemo-dit": (nemo_dit_spec, ["submodules.full_self_attention.submodules.core_attention"]),
    "nemo-dit-official": (nemo_official_dit_spec, ["submodules.full_self_attention.submodules.core_attention"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_apply_dsv_replaces_exactly_the_self_attention(name):
    make, expected = CASES[name]
    spec = make()
    before = flatten(spec)
    out = apply_dsv(spec, CFG)

    assert flatten(spec) == before, "apply_dsv must not modify its input"
    for path in core_attention_paths(spec):
        new = slot(out, path)
        if path in expected:
            assert isinstance(new, ModuleSpec) and new.module is DSVDotProductAttention, path
            assert new.params == {"dsv_config": CFG}, path
        else:  # cross-attention
            assert new is TEDotProductAttention, path
    assert set(expected) <= set(core_attention_paths(spec))
    # Everything else (layer class, adaLN norms, attention classes and their params such as
    # attn_mask_type, linear layers, MLP, empty slots) is unchanged.
    assert outside_core_attention(out) == outside_core_attention(spec)


def test_apply_dsv_on_a_block_of_mixed_flux_layers():
    """Flux builds 19 double + 38 single blocks; a list of both kinds is handled in one call."""
    out = apply_dsv([bridge_flux_double_spec(), bridge_flux_single_spec()], CFG)
    for layer in out:
        assert layer.submodules.self_attention.submodules.core_attention.module is DSVDotProductAttention


def test_stdit_factorised_attention_stays_dense():
    spec = nemo_stdit_spec()
    out = apply_dsv(spec, CFG)
    sub = out.submodules
    assert sub.full_self_attention.submodules.core_attention.module is DSVDotProductAttention
    assert sub.spatial_self_attention.submodules.core_attention is TEDotProductAttention
    assert sub.temporal_self_attention.submodules.core_attention is TEDotProductAttention


def _built_self_attention(layer_spec, slot="full_self_attention", **config):
    """A layer spec's self-attention slot after apply_dsv, built through build_module with TE swapped
    for megatron-core's local modules (SelfAttention, the base of DiTSelfAttention)."""
    out = getattr(apply_dsv(layer_spec, CFG).submodules, slot)
    local = {TEColumnParallelLinear: ColumnParallelLinear, TERowParallelLinear: RowParallelLinear, TENorm: None,
             RMSNorm: None}  # q/k norms: not what these tests are about
    sub = dataclasses.replace(out.submodules, **{
        f.name: local[getattr(out.submodules, f.name)] for f in dataclasses.fields(out.submodules)
        if isinstance(getattr(out.submodules, f.name), type) and getattr(out.submodules, f.name) in local})
    spec = ModuleSpec(module=SelfAttention, params=dict(out.params), submodules=sub)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=2, use_cpu_initialization=True,
                               attention_dropout=0.0, hidden_dropout=0.0, **config)
    attn = build_module(spec, config=config, layer_number=1)
    assert isinstance(attn.core_attention, DSVDotProductAttention)
    return attn


def test_wan_self_attention_subtree_builds_and_runs(megatron_parallel, seeded):
    """The WAN self-attention subtree after apply_dsv builds (padding mask type) and runs forward and
    backward on [s, b, hidden]."""
    attn = _built_self_attention(bridge_wan_spec(), add_qkv_bias=True)
    x = torch.randn(96, 2, 64, requires_grad=True)
    y, _ = attn(x, attention_mask=None)
    assert y.shape == (96, 2, 64) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("qkv_format", ["sbhd", "thd"])
def test_nemo_dit_packed_batch(megatron_parallel, seeded, qkv_format, stage):
    """A packed batch as NeMo's DiT builds it (its task encoder concatenates clips back to back and pads
    to max_seq_length; the patched dit_data_step passes cu_seqlens of the clips and cu_seqlens_padded
    ending at the packed length) through the DiT self-attention after apply_dsv: every clip's output
    and input gradient equal the clip run alone, the padding gets zeros."""
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = _built_self_attention(nemo_dit_spec(AttnMaskType.no_mask)).double()
    if stage == 2:
        ctl = attn.core_attention.controller
        state = ctl.state_dict()
        state["stage"].fill_(2)
        state["step"].fill_(1)  # not a profiling step
        state["block_sparsity"].copy_(torch.tensor([0.5, 0.7]))
        ctl.load_state_dict(state)
    lengths, total = [70, 33, 100], 256
    cu = torch.tensor([0, 70, 103, 203], dtype=torch.int32)
    padded = torch.tensor([0, 70, 103, total], dtype=torch.int32)
    params = PackedSeqParams(qkv_format=qkv_format, cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=padded,
                             cu_seqlens_kv_padded=padded)
    x = torch.randn(total, 1, 64, dtype=torch.float64, requires_grad=True)
    y, _ = attn(x, attention_mask=None, packed_seq_params=params)
    assert attn.core_attention.last_used_sparse == (stage == 2)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    for start, n in zip(cu.tolist(), lengths):
        xc = x.detach()[start:start + n].clone().requires_grad_()
        yc, _ = attn(xc, attention_mask=None)
        yc.square().sum().backward()
        torch.testing.assert_close(y[start:start + n], yc, rtol=0, atol=1e-12)
        torch.testing.assert_close(dx[start:start + n], xc.grad, rtol=0, atol=1e-12)
    # Attention output of padding rows is zero: the module's output there is its output bias alone.
    assert torch.equal(y[203:], y[203:204].expand(total - 203, -1, -1))
