"""The DiT layer's elementwise tails, written once and optionally fused by torch.compile.

At 64k tokens and hidden 2048 every [s, b, h] activation is 268 MB in bf16, and eager
PyTorch makes one pass over device memory per operator: the fp32 q/k RMSNorm alone takes
about a dozen passes forward and more backward. A layer built with ``fused=True`` compiles
the functions below (one kernel forward, one or two backward, instead of a chain of
passes); the MLP's bias + GELU goes through Megatron's fused bias-GELU
(``bias_activation_fusion``). Built with ``fused=False`` the same functions run eagerly,
so both builds compute the same thing and CPU runs need no compiler.

LayerNorm stays outside the compiled graphs, and Inductor's mix-order reduction is off
for them: torch 2.10-2.13 compile LayerNorm + adaLN modulation with a batch of one into a
backward that returns wrongly shaped or silently wrong gradients for the modulation
(pytorch/pytorch#193061, #178080; seen here on an H100 with torch 2.11).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch._inductor.config as inductor_config

_COMPILE_OPTIONS = ({"triton.mix_order_reduction": False}
                    if hasattr(inductor_config.triton, "mix_order_reduction") else {})


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of a normalised x: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


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
    """``fn`` compiled when ``fused``, else ``fn`` itself."""
    return torch.compile(fn, options=_COMPILE_OPTIONS) if fused else fn
