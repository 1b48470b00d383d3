"""The row terms of the predictor's loss in one Triton kernel (LowRankPredictor.gram_loss).

gram_loss reduces the predictor's cosine loss to products with the keys' Gram matrix G: for rows
P = q W and q, the products P G and q G. What follows per row (three dot products, two reciprocal
square roots, the cosine and the gradient's two coefficients, the gradient row) was ~20 small torch
ops, each a kernel of a few microseconds on a few hundred rows: a layer's stage-1 upkeep was 33
kernels (bench/predictor_upkeep.py). Here one program reads BLOCK_R rows of each of P, q, P G and
q G of one (head, batch) once and writes 1 - cos and dL/dP.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 32


@triton.jit
def _cosine_rows_kernel(PQ, PQ_G, OneMinusCos, GradP, N, D, eps_p, eps_t, weight,
                        D_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """PQ, PQ_G [slabs, 2N, D] (rows P then q, and their products with G); OneMinusCos [slabs, N];
    GradP [slabs, N, D]."""
    slab = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < D)
    at_p = slab * 2 * N * D + rows[:, None] * D + cols[None, :]
    at_q = at_p + N * D
    p = tl.load(PQ + at_p, mask=mask, other=0.0)
    q = tl.load(PQ + at_q, mask=mask, other=0.0)
    pg = tl.load(PQ_G + at_p, mask=mask, other=0.0)
    qg = tl.load(PQ_G + at_q, mask=mask, other=0.0)
    pp = tl.sum(pg * p, axis=1)   # |p|^2
    tt = tl.sum(qg * q, axis=1)   # |t|^2 / scale^2
    dot = tl.sum(pg * q, axis=1)  # p.t / scale
    inv_p = 1.0 / tl.sqrt(tl.maximum(pp, eps_p))
    inv_t = 1.0 / tl.sqrt(tl.maximum(tt, eps_t))
    cos = dot * inv_p * inv_t
    coef_p = tl.where(pp > eps_p, cos * inv_p * inv_p, 0.0) * weight
    coef_q = -inv_p * inv_t * weight
    grad = pg * coef_p[:, None] + qg * coef_q[:, None]
    tl.store(OneMinusCos + slab * N + rows, 1.0 - cos, mask=row_ok)
    tl.store(GradP + slab * N * D + rows[:, None] * D + cols[None, :], grad, mask=mask)


def cosine_rows_triton(pq: torch.Tensor, pq_g: torch.Tensor, *, scale: float, weight: float) -> tuple:
    """cosine_rows_reference (ops/reference.py) of float32 pq, pq_g [..., 2n, d]."""
    *lead, two_n, d = pq.shape
    n = two_n // 2
    pq, pq_g = pq.reshape(-1, two_n, d).contiguous(), pq_g.reshape(-1, two_n, d).contiguous()
    slabs = pq.shape[0]
    one_minus_cos = torch.empty(slabs, n, device=pq.device, dtype=torch.float32)
    grad_p = torch.empty(slabs, n, d, device=pq.device, dtype=torch.float32)
    grid = (triton.cdiv(n, BLOCK_R), slabs)
    _cosine_rows_kernel[grid](pq, pq_g, one_minus_cos, grad_p, n, d, 1e-16, 1e-16 / scale ** 2, weight,
                              D_PAD=triton.next_power_of_2(d), BLOCK_R=BLOCK_R)
    return one_minus_cos.view(*lead, n), grad_p.view(*lead, n, d)
