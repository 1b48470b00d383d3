"""A small video Diffusion Transformer built from Megatron-Core layers.

    latent [b, C, T, H, W]
      -> patchify (pt, ph, pw) -> tokens [b, S, C*pt*ph*pw] in raster order
      -> linear patch embedding -> [S, b, hidden] -> cube-major order (CubeLayout)
      -> TransformerBlock of DiTLayers (adaLN-modulated self-attention with 3D RoPE,
         optional text cross-attention, MLP), built from a ModuleSpec
      -> final adaLN + linear -> raster order -> unpatchify -> velocity [b, C, T, H, W]

Self-attention is Megatron's SelfAttention whose ``core_attention`` slot comes from the
spec, so ``megatron_dsv.layers.apply_dsv(spec, cfg)`` turns DSV on by replacing it;
tokens are already in cube order and the 3D RoPE angles are permuted with them.

Conditioning: Megatron's TransformerBlock hands each layer a fixed set of keyword
arguments. Like NeMo's DiT, the layer reads the adaLN conditioning vector [b, hidden]
from the ``attention_mask`` slot (self-attention here is unmasked, so the slot is free).
Captions: no text encoder ships with this example; each caption id owns a fixed random
embedding sequence [text_len, text_dim] drawn from a seeded generator (a stand-in for a
frozen text encoder's output), projected to hidden by a trained MLP and attended to by
CrossAttention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import BaseTransformerLayer

from megatron_dsv.layers import SDPADotProductAttention
from megatron_dsv.video import CubeLayout, PackedClips

from .configs import DiTConfig
from .fused import gated_residual, maybe_fused, modulate, rms_norm_fp32
from .rope import rope_3d

CAPTION_SEED = 1234


# ---------------------------------------------------------------------- layer spec
@dataclass
class DiTLayerSubmodules:
    self_attention: Union[ModuleSpec, type]
    mlp: Union[ModuleSpec, type]
    cross_attention: Optional[Union[ModuleSpec, type]] = None


def dit_layer_spec(cross_attention: bool = True, qk_norm: bool = True,
                   core_attention=SDPADotProductAttention, fused: bool = False) -> ModuleSpec:
    """The DiT layer spec (dense). Pass it through ``apply_dsv`` for DSV self-attention.

    ``fused``: the layer's elementwise tails (adaLN modulation, gated residuals, q/k RMSNorm) run
    compiled (see fused.py); pair it with ``make_transformer_config(fused=True)``.
    """
    qk = ModuleSpec(module=QKNorm, params={"fused": fused}) if qk_norm else None
    self_attn = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.no_mask},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=core_attention,
            linear_proj=RowParallelLinear,
            q_layernorm=qk,
            k_layernorm=qk,
        ),
    )
    cross_attn = None
    if cross_attention:
        cross_attn = ModuleSpec(
            module=CrossAttention,
            params={"attn_mask_type": AttnMaskType.no_mask},
            submodules=CrossAttentionSubmodules(
                linear_q=ColumnParallelLinear,
                linear_kv=ColumnParallelLinear,
                core_attention=SDPADotProductAttention,
                linear_proj=RowParallelLinear,
            ),
        )
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                          linear_fc2=RowParallelLinear))
    return ModuleSpec(module=DiTLayer, params={"fused": fused}, submodules=DiTLayerSubmodules(
        self_attention=self_attn, mlp=mlp, cross_attention=cross_attn))


class QKNorm(nn.Module):
    """RMSNorm over the head dim for queries and keys that returns its input's dtype.

    Under CUDA autocast torch's norms return float32; q and k would then reach core attention
    in float32 next to a bf16 v. This one normalises in float32 and casts back, as fused
    (Transformer Engine) norms do. Same constructor as Megatron's norm builders.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, fused: bool = False,
                 **unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self._rms_norm = maybe_fused(rms_norm_fp32, fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self._rms_norm(x, self.weight, self.eps)


def _per_token(m):
    """Modulation [b, h] (one per sample) -> [1, b, h]; packed clips give one per token, [s, b, h]."""
    return m if m.dim() == 3 else m.unsqueeze(0)


class DiTLayer(MegatronModule, BaseTransformerLayer):
    """Pre-norm transformer layer with adaLN-Zero modulation (DiT, Peebles & Xie 2023).

    x += gate_a * SelfAttn(modulate(LN(x)));  x += CrossAttn(LN(x), text);
    x += gate_m * MLP(modulate(LN(x))). The modulation comes from the conditioning vector
    through a zero-initialised linear, so every layer starts as the identity.
    """

    def __init__(self, config: TransformerConfig, submodules: DiTLayerSubmodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection: Optional[ProcessGroupCollection] = None,
                 vp_stage: Optional[int] = None, fused: bool = False):
        super().__init__(config=config)
        if config.hidden_dropout or (hidden_dropout or 0.0):
            raise NotImplementedError("DiTLayer does not implement hidden dropout; set hidden_dropout=0")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.layer_number = layer_number
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.norm_attn = nn.LayerNorm(h, eps=eps, elementwise_affine=False)
        self.norm_mlp = nn.LayerNorm(h, eps=eps, elementwise_affine=False)
        self._modulate = maybe_fused(modulate, fused)
        self._residual = maybe_fused(gated_residual, fused)
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number,
                                           pg_collection=pg_collection)
        self.cross_attention = None
        if submodules.cross_attention is not None:
            self.norm_cross = nn.LayerNorm(h, eps=eps)
            self.cross_attention = build_module(submodules.cross_attention, config=config,
                                                layer_number=layer_number, pg_collection=pg_collection)
        self.mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size,
                                tp_group=pg_collection.tp)
        self.adaln = nn.Linear(h, 6 * h)
        nn.init.zeros_(self.adaln.weight)
        nn.init.zeros_(self.adaln.bias)

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, rotary_pos_emb=None,
                inference_context=None, packed_seq_params=None, attention_bias=None, **unused):
        for name, value in (("inference_context", inference_context), ("attention_bias", attention_bias),
                            ("context_mask", context_mask), *unused.items()):
            if value is not None:
                raise NotImplementedError(f"DiTLayer does not support {name}")
        cond = attention_mask  # adaLN conditioning [b, h] (packed clips: per token [s, b, h]), see the docstring
        if cond is None or cond.dim() not in (2, 3):
            raise ValueError("DiTLayer needs the conditioning vector [b, hidden] (or [s, b, hidden]) in the "
                             "attention_mask slot")
        mods = self.adaln(F.silu(cond)).chunk(6, dim=-1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        x = hidden_states
        attn_in = self._modulate(self.norm_attn(x), _per_token(shift_a), _per_token(scale_a))
        attn = self.self_attention(attn_in, attention_mask=None, rotary_pos_emb=rotary_pos_emb,
                                   packed_seq_params=packed_seq_params)
        x = self._residual(x, *attn, _per_token(gate_a))
        if self.cross_attention is not None:
            if context is None:
                raise ValueError("this DiT has cross-attention layers: pass caption ids")
            cross = self.cross_attention(self.norm_cross(x), attention_mask=None, key_value_states=context,
                                         packed_seq_params=_caption_params(packed_seq_params, context))
            x = self._residual(x, *cross, None)
        mlp = self.mlp(self._modulate(self.norm_mlp(x), _per_token(shift_m), _per_token(scale_m)))
        x = self._residual(x, *mlp, _per_token(gate_m))
        return x, context


def _caption_params(video_params, context):
    """Cross-attention params of packed clips: clip i's queries attend to caption i (equal lengths)."""
    if video_params is None:
        return None
    clips = video_params.cu_seqlens_q.numel() - 1
    per_clip = context.shape[0] // clips
    return PackedSeqParams(qkv_format=video_params.qkv_format, cu_seqlens_q=video_params.cu_seqlens_q,
                           cu_seqlens_q_padded=video_params.cu_seqlens_q_padded,
                           cu_seqlens_kv=torch.arange(clips + 1, dtype=torch.int32) * per_clip)


# ---------------------------------------------------------------------- model
def patchify(x: torch.Tensor, patch) -> torch.Tensor:
    """[b, C, T, H, W] -> [b, S, C*pt*ph*pw] tokens in raster (t, h, w) order."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, grid, patch, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = tokens.shape[0]
    (gt, gh, gw), (pt, ph, pw) = grid, patch
    x = tokens.reshape(b, gt, gh, gw, channels, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, channels, gt * pt, gh * ph, gw * pw)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] (scaled by 1000) -> MLP -> [b, hidden]."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def make_transformer_config(dit: DiTConfig, *, bf16: bool = False, recompute: bool = False,
                            fused: bool = False) -> TransformerConfig:
    """Megatron TransformerConfig for the DiT trunk (CPU-initialised, so identical on any device).

    The MLP's activation is GELU's tanh approximation either way: ``fused`` selects Megatron's
    jit-fused bias-GELU, which computes that approximation for ``F.gelu``.
    """
    kwargs = {}
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=dit.num_layers,
        hidden_size=dit.hidden_size,
        num_attention_heads=dit.num_heads,
        ffn_hidden_size=dit.ffn_mult * dit.hidden_size,
        kv_channels=dit.head_dim,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=True,
        activation_func=F.gelu if fused else _gelu_tanh,
        bias_activation_fusion=fused,
        apply_rope_fusion=False,
        qk_layernorm=dit.qk_norm,  # megatron-core >= 0.19 only builds the spec's q/k norms when this is set
        use_cpu_initialization=True,
        bf16=bf16,
        params_dtype=torch.float32,
        **kwargs,
    )


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


class VideoDiT(MegatronModule):
    """Video DiT predicting the flow-matching velocity of a latent video.

    Args:
        config: Megatron TransformerConfig of the trunk (see :func:`make_transformer_config`).
        dit: model shape and latent geometry.
        layer_spec: ModuleSpec of one layer (:func:`dit_layer_spec`, optionally via apply_dsv).
        cube: token cube (t, h, w) for the cube-major layout (DSVConfig.cube).
        align: packed clips start on multiples of this many tokens (DSV: max(block_q, block_kv), so
            its layers move no data to align them).
        fused: the final adaLN modulation runs compiled (as the layers' do with a fused spec).
    """

    def __init__(self, config: TransformerConfig, dit: DiTConfig, layer_spec: ModuleSpec, cube=(4, 4, 4),
                 align: int = 1, fused: bool = False):
        super().__init__(config=config)
        self.dit = dit
        self.cube, self.align = tuple(cube), align
        h = dit.hidden_size
        self.layout = CubeLayout(dit.grid, cube)
        self.patch_embed = nn.Linear(dit.patch_dim, h)
        self.t_embedder = TimestepEmbedder(h)
        self.use_text = dit.text_len > 0
        if self.use_text:
            g = torch.Generator().manual_seed(CAPTION_SEED)
            captions = torch.randn(dit.num_captions, dit.text_len, dit.text_dim, generator=g)
            self.register_buffer("caption_table", captions, persistent=False)
            self.text_proj = nn.Sequential(nn.Linear(dit.text_dim, h), nn.GELU(approximate="tanh"), nn.Linear(h, h))
        self.decoder = TransformerBlock(config=config, spec=layer_spec, post_layer_norm=False)
        with torch.no_grad():
            for layer in self.decoder.layers:
                attn = layer.self_attention
                if dit.qk_norm:
                    for norm in (attn.q_layernorm, attn.k_layernorm):
                        norm.weight.fill_(dit.qk_norm_init)
                if dit.qk_tied_init:  # linear_qkv rows are [q_h, k_h, v_h] per head (query groups = heads)
                    w = attn.linear_qkv.weight.view(-1, 3, dit.head_dim, dit.hidden_size)
                    w[:, 1] = w[:, 0]
                    if attn.linear_qkv.bias is not None:
                        b = attn.linear_qkv.bias.view(-1, 3, dit.head_dim)
                        b[:, 1] = b[:, 0]
        self.final_norm = nn.LayerNorm(h, eps=config.layernorm_epsilon, elementwise_affine=False)
        self._final_modulate_fn = maybe_fused(modulate, fused)
        self.final_adaln = nn.Linear(h, 2 * h)
        self.final_linear = nn.Linear(h, dit.patch_dim)
        for lin in (self.final_adaln, self.final_linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        # 3D RoPE angles of the tokens in cube order: they move with the tokens.
        self.register_buffer("rope", rope_3d(self.layout.positions(), dit.head_dim, dit.rope_theta),
                             persistent=False)

    def _final_modulate(self, hidden, cond):
        shift, scale = self.final_adaln(F.silu(cond)).chunk(2, dim=-1)
        return self._final_modulate_fn(self.final_norm(hidden), _per_token(shift), _per_token(scale))

    def forward(self, x: torch.Tensor, t: torch.Tensor, caption: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [b, C, T, H, W] noisy latent, t [b] in [0, 1], caption [b] int64 ids -> velocity like x."""
        dit = self.dit
        expect = (dit.latent_channels, *dit.latent_shape)
        if tuple(x.shape[1:]) != expect:
            raise ValueError(f"expected latent [b, {', '.join(map(str, expect))}], got {tuple(x.shape)}")
        dtype = self.patch_embed.weight.dtype  # bf16 when the trainable weights are (see precision.py)
        tokens = self.patch_embed(patchify(x, dit.patch).to(dtype))  # [b, S, h] raster
        hidden = self.layout.to_cube_bsh(tokens).transpose(0, 1).contiguous()  # [S, b, h] cube order
        cond = self.t_embedder(t)
        context = None
        if self.use_text:
            if caption is None:
                raise ValueError("this model has text cross-attention: pass caption ids")
            context = self.text_proj(self.caption_table[caption].to(dtype)).transpose(0, 1).contiguous()  # [L,b,h]
        hidden = self.decoder(hidden_states=hidden, attention_mask=cond, context=context, rotary_pos_emb=self.rope)
        out = self.final_linear(self._final_modulate(hidden, cond))  # [S, b, patch_dim]
        out = self.layout.from_cube_sbh(out).transpose(0, 1)  # [b, S, patch_dim] raster
        return unpatchify(out, dit.grid, dit.patch, dit.latent_channels)

    def forward_packed(self, xs, t: torch.Tensor, caption: Optional[torch.Tensor] = None):
        """Clips of different shapes in one packed sequence: xs, a list of latents [C, T_i, H_i, W_i];
        t [n], caption [n] -> list of velocities like xs.

        Each clip is patchified, put in cube order and placed on an `align` boundary
        (:class:`megatron_dsv.video.PackedClips`); attention sees Megatron's packed_seq_params in the
        sbhd form (per-token 3D RoPE angles then apply as for one clip; Megatron's THD RoPE would
        restart 1D positions per sequence), so no clip attends to another. Timestep conditioning
        is per token; clip i cross-attends to caption i only.
        """
        dit = self.dit
        grids = [tuple(n // p for n, p in zip(x.shape[1:], dit.patch)) for x in xs]
        clips = PackedClips(grids, self.cube, align=self.align)
        dtype = self.patch_embed.weight.dtype
        tokens = clips.pack([self.patch_embed(patchify(x[None], dit.patch).to(dtype))[0] for x in xs])
        cond = self.t_embedder(t)  # [n, h]
        cond_tok = clips.pack([c.expand(n, -1) for c, n in zip(cond, clips.lengths)])[:, None]  # [S, 1, h]
        context = None
        if self.use_text:
            if caption is None:
                raise ValueError("this model has text cross-attention: pass caption ids")
            context = self.text_proj(self.caption_table[caption].to(dtype)).flatten(0, 1)[:, None]  # [n*L, 1, h]
        rope = rope_3d(clips.positions(), dit.head_dim, dit.rope_theta).to(tokens.device)
        params = clips.packed_seq_params(qkv_format="sbhd")
        hidden = self.decoder(hidden_states=tokens[:, None].contiguous(), attention_mask=cond_tok, context=context,
                              rotary_pos_emb=rope, packed_seq_params=params)
        out = self.final_linear(self._final_modulate(hidden, cond_tok))[:, 0]  # [S, patch_dim]
        return [unpatchify(o[None], grid, dit.patch, dit.latent_channels)[0]
                for o, grid in zip(clips.unpack(out), grids)]


def build_video_dit(dit: DiTConfig, *, dsv_config=None, bf16: bool = False, recompute: bool = False,
                    cube=None, fused: bool = False) -> VideoDiT:
    """The DiT with dense SDPA self-attention, or DSV self-attention when ``dsv_config`` is given.

    ``fused``: compiled elementwise tails and Megatron's fused bias-GELU (meant for GPU runs).
    """
    spec = dit_layer_spec(cross_attention=dit.text_len > 0, qk_norm=dit.qk_norm, fused=fused)
    if dsv_config is not None:
        from megatron_dsv.layers import apply_dsv

        spec = apply_dsv(spec, dsv_config)
        cube = dsv_config.cube
    config = make_transformer_config(dit, bf16=bf16, recompute=recompute, fused=fused)
    align = max(dsv_config.block_q, dsv_config.block_kv) if dsv_config is not None else 1
    return VideoDiT(config, dit, spec, cube=cube or (4, 4, 4), align=align, fused=fused)
