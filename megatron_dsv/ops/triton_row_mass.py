"""Block masses of a few attention rows in Triton, without their logits in memory.

The profiler needs, for its sampled query rows against all keys, the share of each row's softmax
mass in every KV block. Built from materialised float32 logits, that is ~0.3 GB per layer at 16k
tokens (8 heads, batch 2, 256 rows), written by a float32 GEMM and passed over six more times (the
scale, the softmax's read and write, the pad's read and write, the per-block sums). Here one
program takes BLOCK_M rows of one (batch, head) and a span of SPAN KV blocks, and streams those
keys once: per block it sums exp2(s - m) against the running row max m, rescaling the sums of the
span's earlier blocks when m grows, as flash attention rescales its output. It writes the span's
masses normalised within the span and the rows' log-sum-exp over the span; a few small torch ops
weigh each span by its share of the row's mass. Spans rather than whole rows per program: 256 rows
of 16 (batch, head) pairs are only 64 programs of 64 rows, and one program per row tile walking
all 256 KV blocks twice took 0.49 ms per layer (H200), bound by the latency of its serial loop;
by spans, 0.05 ms (bench/results/step_h200/s10).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_M = 64
SPAN = 16   # KV blocks per program


@triton.jit
def _span_mass_kernel(Q, K, Mass, Lse, sq_n, sq_b, sq_h, sk_s, sk_b, sk_h, H, N, S, N_KV, N_SPANS, qk_scale,
                      D, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KV: tl.constexpr, SPAN: tl.constexpr,
                      PREC: tl.constexpr):
    """Mass [b*h, N, N_SPANS * SPAN]: each row's mass in the span's blocks over the span's total; Lse
    [b*h, N, N_SPANS]: log2 of the span's total (of exp2 of the logits times log2(e))."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    span = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None].to(tl.int64) * sq_n + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * sk_b + h * sk_h
    offs_n = tl.arange(0, BLOCK_KV)
    cols = tl.arange(0, SPAN)
    first = span * SPAN
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, SPAN], tl.float32)
    for j in range(first, tl.minimum(first + SPAN, N_KV)):
        tok = j * BLOCK_KV + offs_n
        k = tl.load(k_base + tok[:, None].to(tl.int64) * sk_s + offs_d[None, :],
                    mask=(tok < S)[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where((tok < S)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))   # finite: every KV block holds at least one key
        alpha = tl.exp2(m_i - m_new)
        block = tl.sum(tl.exp2(s - m_new[:, None]), 1)
        l_i = l_i * alpha + block
        acc = acc * alpha[:, None] + tl.where(cols[None, :] == j - first, block[:, None], 0.0)
        m_i = m_new
    base = bh.to(tl.int64) * N + rows
    tl.store(Mass + base[:, None] * (N_SPANS * SPAN) + first + cols[None, :], acc / l_i[:, None],
             mask=row_ok[:, None])
    tl.store(Lse + base * N_SPANS + span, m_i + tl.log2(l_i), mask=row_ok)


def row_block_mass_triton(q: torch.Tensor, k: torch.Tensor, *, scale: float, block_kv: int) -> torch.Tensor:
    """row_block_mass_reference's result (q [n, b, h, d], k [S, b, h, d] -> [b, h, n, n_kv] float32, a view
    of a buffer padded to whole spans) from the kernel. Half-precision inputs multiply on the tensor
    cores with float32 accumulation, as the attention kernels do; other inputs in exact arithmetic."""
    n, b, h, d = q.shape
    s = k.shape[0]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    n_kv = -(-s // block_kv)
    spans = -(-n_kv // SPAN)
    if n == 0 or b * h == 0 or s == 0:
        return torch.zeros(b, h, n, n_kv, device=q.device, dtype=torch.float32)
    mass = torch.empty(b, h, n, spans, SPAN, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, h, n, spans, device=q.device, dtype=torch.float32)
    _span_mass_kernel[(triton.cdiv(n, BLOCK_M), b * h, spans)](
        q, k, mass, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        h, n, s, n_kv, spans, scale * math.log2(math.e),
        D=d, D_PAD=max(16, triton.next_power_of_2(d)), BLOCK_M=BLOCK_M, BLOCK_KV=block_kv, SPAN=SPAN,
        PREC="tf32" if q.dtype in (torch.float16, torch.bfloat16) else "ieee", num_warps=4, num_stages=2)
    # Each span's share of the row's mass: exp2 of its log-sum-exp against the row's (base 2).
    share = torch.softmax(lse * math.log(2.0), dim=-1)
    return mass.mul_(share.unsqueeze(-1)).flatten(-2)[..., :n_kv]
