"""cosine_rows: the per-row terms of the predictor's cosine loss from Gram products (gram_loss)."""

from __future__ import annotations

import torch

from .backend_choice import resolve_backend
from .reference import cosine_rows_reference


def cosine_rows(pq: torch.Tensor, pq_g: torch.Tensor, *, scale: float, weight: float,
                backend: str = "auto") -> tuple:
    """(1 - cos [..., n], dL/dP [..., n, d]) of the rows in pq [..., 2n, d] (P, then q) and pq_g = pq @ G
    (cosine_rows_reference says what they are). On the GPU one Triton kernel (ops/triton_cosine_rows.py)
    for float32 inputs; elsewhere, and for float64, the reference."""
    if resolve_backend(backend, pq.device) == "triton" and pq.dtype == torch.float32:
        from .triton_cosine_rows import cosine_rows_triton
        return cosine_rows_triton(pq, pq_g, scale=scale, weight=weight)
    return cosine_rows_reference(pq, pq_g, scale=scale, weight=weight)
