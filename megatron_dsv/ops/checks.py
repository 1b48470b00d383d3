"""Input checks shared by the attention ops: raised before any work, naming the argument."""

from __future__ import annotations

import math
import os

import torch

from .layout import LAYOUTS, split_dims


def check_qkv(q, k, v, layout: str):
    """q, k, v as the attention ops take them: 4-D in `layout`, one floating dtype, one device, k and
    v with q's batch, heads and head dim (no grouped-query attention; the Triton kernels write an
    output of q's head dim), v with k's length, at least one batch element and token. Returns
    (b, s_q, h, d) and k's length."""
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
    bv, s_v, hv, dv = split_dims(v, layout)
    if (bk, hk, dk) != (b, h, d) or (bv, s_v, hv, dv) != (b, s_kv, h, d):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree ({layout}): k and v need "
            "q's batch, heads and head dim (grouped-query attention and a value head dim of its own are not "
            "supported), v needs k's length"
        )
    if min(b, s_q, s_kv, h, d) < 1:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need at least one batch element, token, "
                         "head and channel")
    return (b, s_q, h, d), s_kv


def check_scale(scale) -> None:
    """A softmax scale: None (1/sqrt(d)) or a positive finite number."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a positive finite number (or None for 1/sqrt(d)), got {scale!r}")


def check_flags(**flags) -> None:
    """Flags that must be bools (a string such as "no" would read as True)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1, on CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_interpreted_dtype(*dtypes: torch.dtype) -> None:
    """Triton's interpreter computes bfloat16 wrongly (errors of order 1e9 in attention): refused there
    rather than returning garbage."""
    if interpreting() and torch.bfloat16 in dtypes:
        raise NotImplementedError("Triton's interpreter (TRITON_INTERPRET=1) computes bfloat16 wrongly; "
                                  "interpret float32 or float16 inputs, or run bfloat16 on the GPU")
