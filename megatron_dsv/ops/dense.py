"""dense_attention: the best dense kernel available (Transformer Engine, else torch SDPA)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .checks import check_qkv, check_scale
from .layout import from_bhsd, seq_dim, to_bhsd

try:  # Optional: used when importable, never required.
    import transformer_engine.pytorch as te
except Exception:  # noqa: BLE001 - any import failure means "not available"
    te = None

# On Hopper cuDNN's fused attention is the fastest SDPA backend; list it first.
_SDPA_PRIORITY = [
    torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
    torch.nn.attention.SDPBackend.FLASH_ATTENTION,
    torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
    torch.nn.attention.SDPBackend.MATH,
]


@functools.lru_cache(maxsize=None)
def _te_attention(heads: int, head_dim: int, scale: float, layout: str):
    return te.DotProductAttention(heads, head_dim, attn_mask_type="no_mask", qkv_format=layout,
                                  softmax_scale=scale, attention_dropout=0.0)


def dense_attention(q, k, v, *, scale=None, layout="bshd", segments=None, kv_segments=None):
    """Full (non-causal) softmax attention, output in q's layout [.., heads, d].

    segments / kv_segments: packed sequences (:class:`megatron_dsv.ops.Segments`) of q and of k/v
    (kv_segments defaults to segments): sequence i of q attends to sequence i of k/v only, one
    dense call per sequence; query padding gets zeros."""
    check_qkv(q, k, v, layout)
    check_scale(scale)
    if segments is not None:
        return _dense_packed(q, k, v, scale, layout, segments, kv_segments or segments)
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    if te is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _te_attention(q.shape[2], d, scale, layout)(q, k, v)
        return out.view(*q.shape[:2], q.shape[2], -1)
    qh, kh, vh = (to_bhsd(t, layout) for t in (q, k, v))
    if q.is_cuda:
        with torch.nn.attention.sdpa_kernel(_SDPA_PRIORITY, set_priority=True):
            out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    return from_bhsd(out, layout)


def _dense_packed(q, k, v, scale, layout, segments, kv_segments):
    dim = seq_dim(layout)
    if len(kv_segments) != len(segments):
        raise ValueError(f"{len(segments)} query sequences but {len(kv_segments)} key/value sequences")
    for name, t, seg in (("q", q, segments), ("k", k, kv_segments), ("v", v, kv_segments)):
        if t.shape[dim] != seg.total:
            raise ValueError(f"{name} holds {t.shape[dim]} tokens, its segments describe {seg.total}")
    outs = [dense_attention(q.narrow(dim, qs, ql), k.narrow(dim, ks, kl), v.narrow(dim, ks, kl),
                            scale=scale, layout=layout)
            for (qs, ql), (ks, kl) in zip(zip(segments.starts, segments.lengths),
                                          zip(kv_segments.starts, kv_segments.lengths))]
    return segments.scatter(torch.cat(outs, dim=dim), dim)  # zeros on query padding
