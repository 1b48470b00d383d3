"""row_block_mass: the share of a few query rows' attention mass in every KV block (the profiler's input)."""

from __future__ import annotations

import torch

from .backend_choice import resolve_backend
from .reference import row_block_mass_reference


def row_block_mass(q: torch.Tensor, k: torch.Tensor, *, scale: float, block_kv: int,
                   backend: str = "auto") -> torch.Tensor:
    """Softmax of the rows q [n, b, h, d] against all keys k [S, b, h, d] (the layer's sbhd layout; strided
    views are fine), summed per KV block of block_kv keys: [b, h, n, ceil(S / block_kv)] float32 (float64
    from the reference for float64 inputs), each row summing to 1. On the GPU a Triton kernel that never
    holds the [n, S] logits (ops/triton_row_mass.py); elsewhere the reference, which does."""
    if resolve_backend(backend, q.device) == "triton":
        from .triton_row_mass import row_block_mass_triton
        return row_block_mass_triton(q, k, scale=scale, block_kv=block_kv)
    return row_block_mass_reference(q, k, scale=scale, block_kv=block_kv)
