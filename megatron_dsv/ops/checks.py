"""Input checks shared by the attention ops: raised before any work, naming the argument."""

from __future__ import annotations

import torch

from .layout import LAYOUTS, split_dims


def check_qkv(q, k, v, layout: str):
    """q, k, v as the attention ops take them: 4-D in `layout`, one floating dtype, one device, k and
    v with q's batch and heads (no grouped-query attention), k with q's head dim, v with k's length,
    at least one batch element and token. Returns (b, s_q, h, d) and k's length."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor ({layout}), got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, s_q, h, d = split_dims(q, layout)
    bk, s_kv, hk, dk = split_dims(k, layout)
    bv, s_v, hv, _ = split_dims(v, layout)
    if (bk, hk, dk) != (b, h, d) or (bv, s_v, hv) != (b, s_kv, h):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree ({layout}): k and v need "
            "q's batch and heads (grouped-query attention is not supported), k needs q's head dim, "
            "v needs k's length"
        )
    if min(b, s_q, s_kv, h, d) < 1:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need at least one batch element, token, "
                         "head and channel")
    return (b, s_q, h, d), s_kv
