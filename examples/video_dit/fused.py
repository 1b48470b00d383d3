"""The DiT layer's elementwise tails, written once and optionally fused by Megatron's jit_fuser.

At 64k tokens and hidden 2048 every [s, b, h] activation is 268 MB in bf16, and eager
PyTorch makes one pass over device memory per operator: the fp32 q/k RMSNorm alone takes
about a dozen passes forward and more backward. A layer built with ``fused=True`` runs the
functions below through ``megatron.core.jit.jit_fuser`` (torch.compile), which turns each
into one kernel forward and one or two backward; the MLP's bias + GELU goes through
Megatron's own fused bias-GELU (``bias_activation_fusion``). Built with ``fused=False`` the
same functions run eagerly, so both builds compute the same thing and CPU runs need no
compiler.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.jit import jit_fuser


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN: LayerNorm without affine over the last dim, then x * (1 + scale) + shift."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


def gated_residual(x: torch.Tensor, y: torch.Tensor, bias: Optional[torch.Tensor],
                   gate: Optional[torch.Tensor]) -> torch.Tensor:
    """x + gate * (y + bias): a sublayer's output (Megatron returns its bias apart) added back."""
    if bias is not None:
        y = y + bias
    return x + (y if gate is None else gate * y)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim computed in float32, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def maybe_fused(fn, fused: bool):
    """``fn`` compiled by Megatron's jit_fuser when ``fused``, else ``fn`` itself."""
    return jit_fuser(fn) if fused else fn
