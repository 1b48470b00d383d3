"""3D rotary position embedding in Megatron's rotary_pos_emb format.

The head dimension d is split into three even parts for the t, h and w axes; each part
rotates with its axis' coordinate. The result is the [S, 1, 1, d] angle tensor that
Megatron's ``apply_rotary_pos_emb`` (non-interleaved: channel i pairs with i + d/2)
consumes, so the stock SelfAttention applies it. The positions are given per token,
so passing the cube-order positions of a CubeLayout makes RoPE follow the tokens.
"""

from __future__ import annotations

from typing import Tuple

import torch


def split_head_dim(d: int) -> Tuple[int, int, int]:
    """(d_t, d_h, d_w), each even, summing to d; h and w equal, t takes the remainder."""
    if d % 2 or d < 6:
        raise ValueError(f"3D RoPE needs an even head dim >= 6, got {d}")
    dhw = 2 * (d // 6)
    return d - 2 * dhw, dhw, dhw


def rope_3d(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles [S, 1, 1, head_dim] float32 for integer (t, h, w) positions [S, 3]."""
    if positions.dim() != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must be [S, 3], got {tuple(positions.shape)}")
    halves = []
    for axis, dim in enumerate(split_head_dim(head_dim)):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
        halves.append(positions[:, axis].float().unsqueeze(1) * inv_freq)  # [S, dim/2]
    half = torch.cat(halves, dim=1)  # [S, d/2]
    return torch.cat([half, half], dim=1)[:, None, None, :]
