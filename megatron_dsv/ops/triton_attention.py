"""Block-sparse flash attention in Triton: forward with online softmax, atomic-free backward.

Layout of the work (one program = one tile of output; no atomics on the default, deterministic path):
  forward  grid (n_qblocks, b*h): one query block against the KV blocks of its list; several
           small KV blocks (block_kv < BLOCK_N) are gathered into one BLOCK_N-row tile.
  dq       grid (n_qblocks, b*h): the same walk as the forward, also writes delta = rowsum(dO*O)
           - dlse (the gradient reaching the returned log-sum-exp, if any: it adds P * dlse to dS).
  dk/dv    grid (n_kvblocks, b*h): one KV block against the query blocks that selected it, read
           from the transposed (KV block -> query blocks) list that `transpose_block_lists` builds
           on the GPU with a sort (no host sync).
  one-recompute backward (one_recompute=True): only the dk/dv walk, whose dS also gives each query
           sub-tile's share of dq, added in float32 with atomics: P and dP are computed once instead of
           twice (7 matrix products per tile for forward + backward instead of 9), but the order of
           the additions, so dq's last bits, varies from run to run. Slower than the default wherever
           measured (1.5-1.7x its backward on an H200 at 64k-128k: writing a float32 share of dq per
           64 x 64 tile costs more than the two products it saves; bench/NOTES_kernels.md).
Tensors are read through their strides: bshd and sbhd views need no copies; on the GPU whole
blocks are loaded through TMA tensor descriptors over the [b, s, h, d] view where that measured
faster. Softmax runs in base 2 (exp2); the log-sum-exp saved for the backward is base 2, the one
returned is natural. The returned lse is differentiable (the CP ring schedule merges partial
results through it). The forward and backward are torch custom ops (megatron_dsv::
block_sparse_attn_fwd / _bwd) with fake implementations, for torch.compile and CUDA graphs.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import check_interpreted_dtype, interpreting
from .layout import from_bhsd, split_dims, to_bhsd

LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 128)  # the tested ones (interpreter: 32, 64; H100: 32, 64, 128)


# --------------------------------------------------------------------------------------------
# Launch configurations. Chosen per (block_q, block_kv) from measurements on H100 (head dim 128)
# (bench/kernels.py, notes in bench/NOTES_kernels.md); `CONFIG_OVERRIDE` lets the benchmark try
# variants without editing the code.
# --------------------------------------------------------------------------------------------
CONFIG_OVERRIDE: dict = {}


# Defaults measured on H100 (64k tokens, 16 heads, d 128, bf16, density 0.1; bench/NOTES_kernels.md):
# 4 warps beat 8 for the forward and dk/dv; TMA loads of whole KV (or query) blocks beat pointer
# gathers by 5-15%; a tile of two 64-row blocks was slower than one block per step.
def _fwd_config(block_q, block_kv):
    # Whole KV blocks (TMA-able) in one stage, without software pipelining of the K/V loads (H200, 16 heads x
    # 128, 10%, 64 x 64 blocks: 7.16 ms against 8.11 with two stages at 64k, 34.5 against 34.7 at 128k; at
    # small's 16k x 8 heads x 64 0.153 against 0.148 ms). One stage takes 126 registers and 32 KB of shared
    # memory, so four programs fit per SM; two stages' 82 KB fit two (bench/NOTES_kernels.md, "One stage").
    cfg = dict(BLOCK_N=max(block_kv, 64), num_warps=4, num_stages=1 if block_kv >= 64 else 2, tma=True)
    cfg.update(CONFIG_OVERRIDE.get("fwd", {}))
    return cfg


def _dq_config(block_q, block_kv):
    cfg = dict(BLOCK_N=max(block_kv, 64), num_warps=8 if block_q >= 128 else 4,
               num_stages=2, tma=True)
    cfg.update(CONFIG_OVERRIDE.get("dq", {}))
    return cfg


def _dkdv_config(block_q, block_kv, atomic_dq=False):
    # KV blocks under 64 rows: dk^T/dv^T accumulators (D_MAJOR) keep every product's M >= 64
    # (33.1 vs 37.4 ms at block_kv 16), and pointer loads beat TMA there (33.1 vs 39.5 ms).
    # The one-recompute kernel (atomic_dq) also holds each sub-tile's dq: its own config and override
    # key. Of 12 variants on H200 (64k, 64x64, density 0.1) dk^T/dv^T accumulators with pointer loads
    # were fastest, 39.0 ms with dq_tma (its adds as TMA bulk reductions, DQ_TMA in the kernel, where a
    # descriptor can be made) against 39.6 with scalar atomics; the dk/dv kernel alone takes 13.0 ms.
    cfg = dict(BLOCK_M=min(block_q, 64), num_warps=4 if block_kv <= 64 else 8, num_stages=2,
               tma=block_kv >= 64 and not atomic_dq, D_MAJOR=block_kv < 64 or atomic_dq)
    if atomic_dq:
        cfg["dq_tma"] = True
    cfg.update(CONFIG_OVERRIDE.get("dkdv_atomic" if atomic_dq else "dkdv", {}))
    return cfg


def _tma_descriptor(x: torch.Tensor, layout: str, rows: int):
    """A TMA descriptor over x seen as [b, s, h, d] that loads [1, rows, 1, d] tiles, or None where
    TMA cannot be used (interpreter, CPU, strides or base not 16-byte aligned)."""
    if interpreting() or not x.is_cuda:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, s, h, d = split_dims(x, layout)
    sb, ss, sh = _bsh_strides(x, layout)
    esz = x.element_size()
    if x.data_ptr() % 16 or any((st * esz) % 16 for st in (sb, ss, sh)):
        return None
    return TensorDescriptor(x, shape=[b, s, h, d], strides=[sb, ss, sh, 1], block_shape=[1, rows, 1, d])


def _dq_acc_descriptor(dq_acc: Optional[torch.Tensor], rows: int):
    """A TMA descriptor over the one-recompute backward's float32 dq accumulator [b, h, Sq, d] seen as
    [b*h, Sq, d], for bulk reductions of [1, rows, d] tiles; None where TMA cannot be used."""
    if dq_acc is None or interpreting() or not dq_acc.is_cuda or dq_acc.numel() == 0:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, h, s, d = dq_acc.shape
    return TensorDescriptor(dq_acc.view(b * h, s, d), shape=[b * h, s, d], strides=[s * d, d, 1],
                            block_shape=[1, rows, d])


def _launch_opts(cfg, descs_for):
    """Split a config into kernel meta-parameters, with the TMA descriptors (or None) it asks for."""
    cfg = dict(cfg)
    use_tma = cfg.pop("tma")
    descs = [_tma_descriptor(*a) for a in descs_for] if use_tma else [None] * len(descs_for)
    use_tma = use_tma and all(dsc is not None for dsc in descs)
    return cfg, (descs if use_tma else [None] * len(descs)), use_tma


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _kv_rows(idx_ptr, stride_slot, start, cnt, len_ptr, S_KV,
             BLOCK_N: tl.constexpr, BLOCK_KV: tl.constexpr, USE_TMA: tl.constexpr, VARLEN: tl.constexpr):
    """First token, token ids and validity of the BLOCK_N KV rows made of list slots
    start .. start + BLOCK_N / BLOCK_KV (with TMA, one whole block: BLOCK_N == BLOCK_KV).
    A row is valid if its token exists and, with VARLEN, lies within its block's valid length
    (len_ptr[block]; padding of packed clips sits at the end of a clip's last block).
    Block ids are not checked on the host (that needs a sync): one outside [0, n_kv) reads nothing out of
    bounds (TMA zero-fills rows outside the tensor; a gather reads block 0 instead, its rows masked where
    MASK_KV; the block's length is not read), but its result is wrong, as for any invalid list."""
    offs_n = tl.arange(0, BLOCK_N)
    if USE_TMA:
        blk = tl.load(idx_ptr + start * stride_slot)
        row0 = blk * BLOCK_KV
        tok = row0 + offs_n
        ok = tok < S_KV
        if VARLEN:
            blk_ok = (blk >= 0) & (blk <= (S_KV - 1) // BLOCK_KV)
            ok = ok & (offs_n < tl.load(len_ptr + blk, mask=blk_ok, other=0))
    else:
        slot = start + offs_n // BLOCK_KV
        slot_ok = slot < cnt
        blk = tl.load(idx_ptr + slot * stride_slot, mask=slot_ok, other=0)
        # An id out of range reads block 0 instead (loads are unmasked where blocks are whole). Compared as
        # ids: blk * BLOCK_KV of a far-out id would wrap around in int32.
        blk_ok = (blk >= 0) & (blk <= (S_KV - 1) // BLOCK_KV)
        slot_ok = slot_ok & blk_ok
        blk = tl.where(blk_ok, blk, 0)
        tok = blk * BLOCK_KV + offs_n % BLOCK_KV
        ok = slot_ok & (tok < S_KV)
        if VARLEN:
            ok = ok & (offs_n % BLOCK_KV < tl.load(len_ptr + blk, mask=slot_ok, other=0))
        row0 = 0
    return row0, tok, ok


@triton.jit
def _load_rows(base, desc, stride_s, b, h, row0, tok, ok,
               ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, MASK: tl.constexpr):
    """A [ROWS, HEAD_DIM] tile of one head: rows row0.. through a TMA descriptor (rows past the
    end read as 0), or gathered rows `tok` through pointers (masked rows read as 0)."""
    if USE_TMA:
        x = desc.load([b, row0, h, 0]).reshape(ROWS, HEAD_DIM)
    else:
        ptrs = base + tok.to(tl.int64)[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :]
        if MASK:
            x = tl.load(ptrs, mask=ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse2, KvIdx, KvCnt, KvBeg, KvLen, QLen, KDesc, VDesc,
                sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s, so_h,
                si_b, si_h, si_q, si_k, sc_b, sc_h, sc_q, sl_bh,
                H, S_Q, S_KV, K_MAX, qk_scale2,
                BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr,
                HEAD_DIM: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr, MASK_KV: tl.constexpr,
                VARLEN: tl.constexpr, Q_VARLEN: tl.constexpr, SPLIT: tl.constexpr, RESUME: tl.constexpr):
    """Q_VARLEN: rows past the query block's valid length (QLen: padding of packed clips) get
    output 0 and a base-2 lse of +inf, which makes their probabilities 0 in the backward (no
    dq, no dk/dv contribution, whatever gradient reaches them).
    SPLIT: one pass of several over the KV span: list slots KvBeg .. KvCnt (else 0 .. KvCnt).
    RESUME: a pass after the first; it starts from the output and lse the earlier passes wrote
    (their softmax state: running max lse, sum 1, accumulator out) instead of from nothing."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b32 = bh // H
    h32 = bh % H
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    PACK: tl.constexpr = BLOCK_N // BLOCK_KV

    offs_m = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < S_Q
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_s + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    idx_ptr = KvIdx + b * si_b + h * si_h + qb * si_q
    cnt = tl.minimum(tl.load(KvCnt + b * sc_b + h * sc_h + qb * sc_q), K_MAX)   # (not checked on the host)
    beg = 0
    if SPLIT:
        beg = tl.load(KvBeg + b * sc_b + h * sc_h + qb * sc_q)
    len_ptr = KvLen + bh.to(tl.int64) * sl_bh
    out_ptrs = Out + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_s + offs_d[None, :]
    lse_ptrs = Lse2 + bh.to(tl.int64) * S_Q + offs_m

    if RESUME:
        m_i = tl.load(lse_ptrs, mask=m_ok, other=float("-inf"))
        if Q_VARLEN:  # padding rows (lse +inf) start empty: a running max of +inf would give inf - inf = NaN
            m_i = tl.where(m_i == float("inf"), float("-inf"), m_i)
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)   # a row with no keys yet stays empty
        acc = tl.load(out_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
    else:
        m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    for start in range(beg, cnt, PACK):
        row0, tok, ok = _kv_rows(idx_ptr, si_k, start, cnt, len_ptr, S_KV, BLOCK_N, BLOCK_KV, USE_TMA,
                                  VARLEN)
        k = _load_rows(k_base, KDesc, sk_s, b32, h32, row0, tok, ok, BLOCK_N, HEAD_DIM, USE_TMA, MASK_KV)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)   # unscaled: the scale goes into the exponent's FMA
        if MASK_KV:
            s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale2)   # the scale is positive: max(c s) = c max(s)
        m_ref = m_new
        if VARLEN:  # no valid key so far (blocks of length 0): exp2 of (-inf) - (-inf) would be NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s * qk_scale2 - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, VDesc, sv_s, b32, h32, row0, tok, ok, BLOCK_N, HEAD_DIM, USE_TMA, MASK_KV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    empty = l_i == 0.0  # count 0: no keys at all
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    if Q_VARLEN:
        row_ok = tl.arange(0, BLOCK_Q) < tl.load(QLen + qb)
        out = tl.where(row_ok[:, None], out, 0.0)
        lse2 = tl.where(row_ok, lse2, float("inf"))
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None])
    tl.store(lse_ptrs, lse2, mask=m_ok)


@triton.jit
def _dq_kernel(Q, K, V, O, DO, DQ, Lse2, DLse2, Delta, KvIdx, KvCnt, KvBeg, KvLen, KDesc, VDesc,
               sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s, so_h,
               sdo_b, sdo_s, sdo_h, sdq_b, sdq_s, sdq_h,
               si_b, si_h, si_q, si_k, sc_b, sc_h, sc_q, sl_bh,
               H, S_Q, S_KV, K_MAX, qk_scale2, scale,
               BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr, MASK_KV: tl.constexpr,
               HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr, Q_VARLEN: tl.constexpr,
               SPLIT: tl.constexpr, RESUME: tl.constexpr):
    """Q_VARLEN: padding rows (lse +inf, see _fwd_kernel) read as zero q and dO, so whatever they
    hold (NaN included) gives them dq 0 and delta 0.
    SPLIT, RESUME: one pass of several over the KV span, as in _fwd_kernel; a later pass adds its
    share to the dq the earlier ones wrote."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b32 = bh // H
    h32 = bh % H
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    PACK: tl.constexpr = BLOCK_N // BLOCK_KV

    offs_m = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < S_Q
    rows = offs_m[:, None].to(tl.int64)
    lse2 = tl.load(Lse2 + bh.to(tl.int64) * S_Q + offs_m, mask=m_ok, other=float("inf"))
    live = m_ok
    if Q_VARLEN:
        live = live & (lse2 != float("inf"))
    q = tl.load(Q + b * sq_b + h * sq_h + rows * sq_s + offs_d[None, :], mask=live[:, None], other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows * sdo_s + offs_d[None, :], mask=live[:, None], other=0.0)
    o = tl.load(O + b * so_b + h * so_h + rows * so_s + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        # d lse / d s = P, so dS = P * (dP - delta + dlse); dlse per natural-log unit = dlse2 * LOG2E.
        # Rows with no keys (count 0) are read by no program, so whatever dlse holds there is unused.
        dlse2 = tl.load(DLse2 + bh.to(tl.int64) * S_Q + offs_m, mask=m_ok, other=0.0)
        delta = delta - dlse2 * 1.4426950408889634
    tl.store(Delta + bh.to(tl.int64) * S_Q + offs_m, delta, mask=m_ok)

    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    idx_ptr = KvIdx + b * si_b + h * si_h + qb * si_q
    cnt = tl.minimum(tl.load(KvCnt + b * sc_b + h * sc_h + qb * sc_q), K_MAX)   # (not checked on the host)
    beg = 0
    if SPLIT:
        beg = tl.load(KvBeg + b * sc_b + h * sc_h + qb * sc_q)
    len_ptr = KvLen + bh.to(tl.int64) * sl_bh
    dq = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    for start in range(beg, cnt, PACK):
        row0, tok, ok = _kv_rows(idx_ptr, si_k, start, cnt, len_ptr, S_KV, BLOCK_N, BLOCK_KV, USE_TMA,
                                  VARLEN)
        k = _load_rows(k_base, KDesc, sk_s, b32, h32, row0, tok, ok, BLOCK_N, HEAD_DIM, USE_TMA, MASK_KV)
        v = _load_rows(v_base, VDesc, sv_s, b32, h32, row0, tok, ok, BLOCK_N, HEAD_DIM, USE_TMA, MASK_KV)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale2
        p = tl.exp2(s - lse2[:, None])
        if MASK_KV:
            p = tl.where(ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq_ptrs = DQ + b * sdq_b + h * sdq_h + rows * sdq_s + offs_d[None, :]
    dq = dq * scale
    if RESUME:
        dq += tl.load(dq_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _add_dq(DQ, desc, bh, row_base, row0, offs_m, m_ok, dq, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
            USE_TMA: tl.constexpr):
    """Add a [BLOCK_M, HEAD_DIM] float32 share of dq into DQ's rows row0.. of head bh, with no ordering
    against other memory operations (DQ is read only after the kernel ends)."""
    if USE_TMA:
        desc.atomic_add([bh, row0, 0], dq.reshape(1, BLOCK_M, HEAD_DIM))
    else:
        tl.atomic_add(DQ + (row_base + offs_m)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], dq,
                      mask=m_ok[:, None], sem="relaxed")


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, DQ, Lse2, Delta, QIdx, QBeg, QEnd, KvLen, QDesc, DODesc, DQDesc,
                 sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_s, sdo_h,
                 sdk_b, sdk_s, sdk_h, sdv_b, sdv_s, sdv_h, sl_bh,
                 H, N_KV, S_Q, S_KV, qk_scale2, scale,
                 BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr,
                 HEAD_DIM: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr, MASK_Q: tl.constexpr,
                 D_MAJOR: tl.constexpr, VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr,
                 Q_VARLEN: tl.constexpr, RESUME: tl.constexpr):
    """D_MAJOR: accumulate dk^T, dv^T [HEAD_DIM, BLOCK_KV] so that every product has a large M
    (query rows or head dim) even for 16-row KV blocks, instead of M = BLOCK_KV.
    VARLEN: keys past the block's valid length (KvLen) read as 0 and get zero gradients (they are
    masked when the block is stored; in the loop their columns mix with the others only in dq).
    ATOMIC_DQ: the one-recompute schedule: each sub-tile's dS also gives its rows' share of dq,
    added in float32 to DQ ([b, h, Sq, HEAD_DIM] contiguous) with atomics; keys outside the
    sequence or the block's valid length take no part in it (there they do mix). The adds are
    relaxed (plain reductions, no ordering with other memory): tl.atomic_add's default acq_rel
    fences every one, and the backward measured 7.5x slower than the two-kernel schedule with it.
    DQ_TMA: the adds go through a TMA descriptor over DQ seen as [b*h, Sq, HEAD_DIM] (one bulk
    reduction of the whole sub-tile from shared memory, issued asynchronously; rows past Sq are
    clipped by the descriptor) instead of BLOCK_M * HEAD_DIM scalar atomics.
    Q_VARLEN: padding rows (lse +inf) take part with zero q, dO and dS, whatever they hold.
    The query blocks of KV block kb are QIdx[QBeg[kb] : QEnd[kb]] (per batch and head): all of its
    list, or one pass's share when the query span is cut into passes; RESUME (a pass after the
    first) adds to the dk and dv the earlier passes wrote."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b32 = bh // H
    h32 = bh % H
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)

    offs_n = kb * BLOCK_KV + tl.arange(0, BLOCK_KV)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < S_KV
    key_ok = n_ok
    if VARLEN:
        key_ok = key_ok & (tl.arange(0, BLOCK_KV) < tl.load(KvLen + bh.to(tl.int64) * sl_bh + kb))
    cols = offs_n[:, None].to(tl.int64)
    # Keys past the valid length read as 0: whatever they hold (NaN included) must not reach dq.
    k = tl.load(K + b * sk_b + h * sk_h + cols * sk_s + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + cols * sv_s + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    q_base = Q + b * sq_b + h * sq_h
    do_base = DO + b * sdo_b + h * sdo_h
    row_base = bh.to(tl.int64) * S_Q

    seg = bh.to(tl.int64) * N_KV + kb
    first = tl.load(QBeg + seg)
    last = tl.load(QEnd + seg)
    if D_MAJOR:
        dk = tl.zeros([HEAD_DIM, BLOCK_KV], tl.float32)
        dv = tl.zeros([HEAD_DIM, BLOCK_KV], tl.float32)
    else:
        dk = tl.zeros([BLOCK_KV, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_KV, HEAD_DIM], tl.float32)
    SUB: tl.constexpr = BLOCK_Q // BLOCK_M
    # One flat loop over (list entry, BLOCK_M sub-tile): measured 25% faster on H100 than a
    # static inner loop over the sub-tiles (the loads pipeline across sub-tiles).
    for j in range(first * SUB, last * SUB):
        qi = tl.load(QIdx + j // SUB)
        row0 = (qi * BLOCK_Q + (j % SUB) * BLOCK_M).to(tl.int32)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < S_Q
        q = _load_rows(q_base, QDesc, sq_s, b32, h32, row0, offs_m, m_ok, BLOCK_M, HEAD_DIM, USE_TMA, MASK_Q)
        do = _load_rows(do_base, DODesc, sdo_s, b32, h32, row0, offs_m, m_ok, BLOCK_M, HEAD_DIM, USE_TMA, MASK_Q)
        # Rows past S_Q get lse +inf, so their probabilities are 0.
        lse2 = tl.load(Lse2 + row_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)
        if Q_VARLEN:
            live = lse2 != float("inf")
            q = tl.where(live[:, None], q, 0.0)
            do = tl.where(live[:, None], do, 0.0)
            delta = tl.where(live, delta, 0.0)
        if D_MAJOR:
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale2
            p = tl.exp2(s - lse2[:, None])
            dv += tl.dot(tl.trans(do), p.to(do.dtype), input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(q), ds.to(q.dtype), input_precision=PREC)
            if ATOMIC_DQ:
                dq = tl.dot(tl.where(key_ok[None, :], ds, 0.0).to(k.dtype), k, input_precision=PREC)
                _add_dq(DQ, DQDesc, bh, row_base, row0, offs_m, m_ok, dq * scale, BLOCK_M, HEAD_DIM, DQ_TMA)
        else:
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale2
            pt = tl.exp2(st - lse2[None, :])
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(tl.where(key_ok[:, None], dst, 0.0).to(k.dtype)), k, input_precision=PREC)
                _add_dq(DQ, DQDesc, bh, row_base, row0, offs_m, m_ok, dq * scale, BLOCK_M, HEAD_DIM, DQ_TMA)
    if VARLEN:
        keep = tl.arange(0, BLOCK_KV) < tl.load(KvLen + bh.to(tl.int64) * sl_bh + kb)
        if D_MAJOR:
            dk = tl.where(keep[None, :], dk, 0.0)
            dv = tl.where(keep[None, :], dv, 0.0)
        else:
            dk = tl.where(keep[:, None], dk, 0.0)
            dv = tl.where(keep[:, None], dv, 0.0)
    dk = dk * scale
    if D_MAJOR:
        tcols = offs_n[None, :].to(tl.int64)
        dk_ptrs = DK + b * sdk_b + h * sdk_h + tcols * sdk_s + offs_d[:, None]
        dv_ptrs = DV + b * sdv_b + h * sdv_h + tcols * sdv_s + offs_d[:, None]
        ok = n_ok[None, :]
    else:
        dk_ptrs = DK + b * sdk_b + h * sdk_h + cols * sdk_s + offs_d[None, :]
        dv_ptrs = DV + b * sdv_b + h * sdv_h + cols * sdv_s + offs_d[None, :]
        ok = n_ok[:, None]
    if RESUME:
        dk += tl.load(dk_ptrs, mask=ok, other=0.0).to(tl.float32)
        dv += tl.load(dv_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel output; tests replace it to poison outputs with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(x: torch.Tensor) -> str:
    """float32 inputs get exact float32 products (Triton's default for them is tf32)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _bsh_strides(x: torch.Tensor, layout: str):
    """(batch, seq, head) strides of a bshd/sbhd tensor; the head dim must be unit-stride."""
    if layout == "bshd":
        return x.stride(0), x.stride(1), x.stride(2)
    return x.stride(1), x.stride(0), x.stride(2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """Kernels vectorise along the head dim; a view with a strided head dim is copied once."""
    return x if x.stride(-1) == 1 else x.contiguous()


# The L2 working set. At long lengths the programs in flight are consecutive blocks of one head, each
# gathering its own blocks from anywhere in that head's K and V (forward, dq) or Q and dO (dk/dv).
# Once those span more than L2 holds, the hit rate falls and the kernels slow down (H200, 128k
# tokens, head dim 128, density 0.1: 55% hits and a 41 ms forward over the whole span, 96% and
# 33 ms over half of it; bench/results/l2_footprint_h200.json). So the span is cut into passes of
# at most L2_SHARE of L2 each, launched one after the other; a later pass resumes from what the
# earlier ones wrote. Intermediate results are stored in the output's dtype (one more rounding
# per pass), so the passes are few: MAX_PASSES.
L2_SHARE = 0.7
MAX_PASSES = 8


@functools.cache
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0


def _passes(blocks: int, block: int, d: int, elem_size: int, device: torch.device) -> int:
    """Passes over a span of `blocks` blocks of `block` tokens of two [.., d] tensors of one head
    (CONFIG_OVERRIDE["pass_bytes"] sets the bytes per pass: the interpreter has no L2)."""
    budget = CONFIG_OVERRIDE.get("pass_bytes") or L2_SHARE * _l2_bytes(device)
    if not budget:
        return 1
    return max(1, min(MAX_PASSES, blocks, math.ceil(2 * blocks * block * d * elem_size / budget)))


def _pass_edges(n: int, passes: int, device) -> torch.Tensor:
    """Pass p covers blocks [edges[p], edges[p + 1]) of n."""
    return torch.arange(passes + 1, device=device) * n // passes


def kv_pass_lists(kv_idx: torch.Tensor, kv_cnt: torch.Tensor, n_kv: int, passes: int):
    """Each query block's list in ascending order and where each KV pass's share of it lies, on the
    device with no host sync. Returns (ids int32 [b, h, n_q, k_max]: kv_idx ascending within the
    count, n_kv after it; bounds int32 [passes + 1, b, h, n_q]: pass p's blocks are the slots
    bounds[p] .. bounds[p + 1])."""
    slot_ok = torch.arange(kv_idx.shape[-1], device=kv_idx.device) < kv_cnt.unsqueeze(-1)
    ids = torch.where(slot_ok, kv_idx.to(torch.int32), n_kv).sort(dim=-1).values
    edges = _pass_edges(n_kv, passes, kv_idx.device).to(torch.int32)
    bounds = torch.searchsorted(ids, edges.expand(*ids.shape[:-1], passes + 1).contiguous(), out_int32=True)
    return ids, bounds.permute(3, 0, 1, 2).contiguous()


def transpose_block_lists(kv_idx: torch.Tensor, kv_cnt: torch.Tensor, n_kv: int, passes: int = 1):
    """KV block -> query blocks lists in CSR form, built on the device with no host sync.

    Returns (q_idx int32 [b*h*n_q*k_max]: query block ids grouped by (b, h, kv block), ascending
    within a group; q_bounds int64 [passes + 1, b*h*n_kv]: the query blocks of group g in pass p
    (those in [p * n_q // passes, (p + 1) * n_q // passes)) are q_idx[q_bounds[p, g]:q_bounds[p + 1, g]],
    all of them q_idx[q_bounds[0, g]:q_bounds[-1, g]]).
    Entries past each count sort to the end behind a sentinel key and are never referenced.
    """
    b, h, n_q, k_max = kv_idx.shape
    dev = kv_idx.device
    groups = b * h * n_kv
    key_dtype = _sort_key_dtype((groups + 1) * n_q)   # keys group * n_q + query block, the sentinel group's too
    slot_ok = torch.arange(k_max, device=dev) < kv_cnt.unsqueeze(-1)
    bh = torch.arange(b * h, device=dev, dtype=key_dtype).view(b, h, 1, 1)
    qi = torch.arange(n_q, device=dev, dtype=key_dtype).view(1, 1, n_q, 1)
    # Ids are not checked on the host: one out of range is taken as a block of its own head (clamped), never
    # as another head's.
    ids = kv_idx.clamp(0, n_kv - 1).to(key_dtype)
    group = torch.where(slot_ok, bh * n_kv + ids, groups)   # past the count: the sentinel group
    keys = torch.sort((group * n_q + qi).reshape(-1)).values
    q_idx = (keys % n_q).to(torch.int32)
    starts = torch.arange(groups, device=dev, dtype=key_dtype) * n_q
    q_bounds = torch.searchsorted(keys, starts + _pass_edges(n_q, passes, dev).to(key_dtype).view(-1, 1))
    return q_idx, q_bounds


def _sort_key_dtype(span: int) -> torch.dtype:
    """The narrowest integer type for sort keys in [0, span). A radix sort makes one pass per key byte: at 64k
    x 16 heads and 10% on an H200 the whole of transpose_block_lists, timed alone, took 0.28 ms with 32-bit
    keys against 0.53 with 64-bit ones; in a profiled forward + backward its sort's kernels took 0.10 against
    0.20 ms of device time (bench/NOTES_kernels.md)."""
    return torch.int32 if span <= torch.iinfo(torch.int32).max + 1 else torch.int64


def _len_stride(kv_len: Optional[torch.Tensor]) -> int:
    """Row stride of kv_len [1 or b*h, n_kvblocks]; 0 broadcasts one row to every (batch, head)."""
    return 0 if kv_len is None or kv_len.shape[0] == 1 else kv_len.stride(0)


def _check_supported(q, d):
    if d not in HEAD_DIMS:
        raise NotImplementedError(f"triton block-sparse attention supports head dims {HEAD_DIMS}, got {d}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise NotImplementedError(f"triton block-sparse attention supports fp16/bf16/fp32, got {q.dtype}")
    check_interpreted_dtype(q.dtype)


def _kv_passes(kv_idx, kv_cnt, s_kv, block_kv, k):
    """(lists, first slots, end slots, resume) of each pass of the forward or dq kernel over the KV span
    (one pass: the lists as given, slots 0 .. kv_cnt; the kernels then read no first slot)."""
    n_kv = -(-s_kv // block_kv)
    passes = _passes(n_kv, block_kv, k.shape[-1], k.element_size(), k.device)
    if passes == 1:
        return [(kv_idx, kv_cnt, kv_cnt, False)]
    ids, bounds = kv_pass_lists(kv_idx, kv_cnt, n_kv, passes)
    return [(ids, bounds[p], bounds[p + 1], p > 0) for p in range(passes)]


def _forward(q, k, v, kv_idx, kv_cnt, kv_len, q_len, block_q, block_kv, scale, layout):
    if not scale > 0:   # the kernel takes each row's max before scaling: max(c s) = c max(s) needs c > 0
        raise ValueError(f"the softmax scale must be positive, got {scale!r}")
    b, s_q, h, d = split_dims(q, layout)
    s_kv = split_dims(k, layout)[1]
    n_q = kv_idx.shape[2]
    out = _empty(q.shape, q.dtype, q.device)  # contiguous in q's layout
    lse2 = _empty((b, h, s_q), torch.float32, q.device)
    cfg = _fwd_config(block_q, block_kv)
    whole = cfg["BLOCK_N"] == block_kv  # TMA loads whole KV blocks only
    cfg, descs, use_tma = _launch_opts(dict(cfg, tma=cfg["tma"] and whole),
                                       [(k, layout, block_kv), (v, layout, block_kv)])
    # Packed tiles, a partial last block or padding inside blocks need the key mask.
    mask_kv = cfg["BLOCK_N"] != block_kv or s_kv % block_kv != 0 or kv_len is not None
    for ids, beg, end, resume in _kv_passes(kv_idx, kv_cnt, s_kv, block_kv, k):
        _fwd_kernel[(n_q, b * h)](
            q, k, v, out, lse2, ids, end, beg, kv_cnt if kv_len is None else kv_len,
            kv_cnt if q_len is None else q_len, *descs,
            *_bsh_strides(q, layout), *_bsh_strides(k, layout), *_bsh_strides(v, layout),
            *_bsh_strides(out, layout),
            *ids.stride(), *end.stride(), _len_stride(kv_len),
            h, s_q, s_kv, ids.shape[-1], scale * LOG2E,
            BLOCK_Q=block_q, BLOCK_KV=block_kv, HEAD_DIM=d, PREC=_precision(q), USE_TMA=use_tma,
            MASK_KV=mask_kv, VARLEN=kv_len is not None, Q_VARLEN=q_len is not None, SPLIT=beg is not end,
            RESUME=resume, **cfg)
    return out, lse2


def _dq(do, q, k, v, out, lse2, dlse2, kv_idx, kv_cnt, kv_len, block_q, block_kv, scale, layout, q_varlen):
    """dq over each query block's KV list; also returns delta = rowsum(dO * O) - dlse for dk/dv."""
    b, s_q, h, d = split_dims(q, layout)
    s_kv = split_dims(k, layout)[1]
    n_q = kv_idx.shape[2]
    dq = _empty(q.shape, q.dtype, q.device)
    delta = _empty((b, h, s_q), torch.float32, q.device)
    cfg = _dq_config(block_q, block_kv)
    whole = cfg["BLOCK_N"] == block_kv
    cfg, descs, use_tma = _launch_opts(dict(cfg, tma=cfg["tma"] and whole),
                                       [(k, layout, block_kv), (v, layout, block_kv)])
    mask_kv = cfg["BLOCK_N"] != block_kv or s_kv % block_kv != 0 or kv_len is not None
    for ids, beg, end, resume in _kv_passes(kv_idx, kv_cnt, s_kv, block_kv, k):
        _dq_kernel[(n_q, b * h)](
            q, k, v, out, do, dq, lse2, lse2 if dlse2 is None else dlse2, delta, ids, end, beg,
            kv_cnt if kv_len is None else kv_len, *descs,
            *_bsh_strides(q, layout), *_bsh_strides(k, layout), *_bsh_strides(v, layout),
            *_bsh_strides(out, layout), *_bsh_strides(do, layout), *_bsh_strides(dq, layout),
            *ids.stride(), *end.stride(), _len_stride(kv_len),
            h, s_q, s_kv, ids.shape[-1], scale * LOG2E, scale,
            BLOCK_Q=block_q, BLOCK_KV=block_kv, HEAD_DIM=d, PREC=_precision(q), USE_TMA=use_tma,
            MASK_KV=mask_kv, HAS_DLSE=dlse2 is not None, VARLEN=kv_len is not None, Q_VARLEN=q_varlen,
            SPLIT=beg is not end, RESUME=resume, **cfg)
    return dq, delta


def _dkdv(do, q, k, v, lse2, delta, q_idx, q_bounds, kv_len, block_q, block_kv, scale, layout, q_varlen,
          dq_acc=None):
    """dk, dv over each KV block's transposed list (query blocks that selected it), one pass per row of
    q_bounds but the last (transpose_block_lists); with dq_acc (float32 [b, h, Sq, d], zeroed), also dq,
    added there with atomics. q_varlen: rows with lse +inf are padding."""
    b, s_q, h, d = split_dims(q, layout)
    s_kv = split_dims(k, layout)[1]
    n_kv = -(-s_kv // block_kv)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    cfg = _dkdv_config(block_q, block_kv, atomic_dq=dq_acc is not None)
    dq_desc = _dq_acc_descriptor(dq_acc, cfg["BLOCK_M"]) if cfg.pop("dq_tma", False) else None
    cfg, descs, use_tma = _launch_opts(cfg, [(q, layout, cfg["BLOCK_M"]), (do, layout, cfg["BLOCK_M"])])
    for p in range(q_bounds.shape[0] - 1):
        _dkdv_kernel[(n_kv, b * h)](
            q, k, v, do, dk, dv, dk if dq_acc is None else dq_acc, lse2, delta, q_idx, q_bounds[p], q_bounds[p + 1],
            q_idx if kv_len is None else kv_len, *descs, dq_desc,
            *_bsh_strides(q, layout), *_bsh_strides(k, layout), *_bsh_strides(v, layout),
            *_bsh_strides(do, layout), *_bsh_strides(dk, layout), *_bsh_strides(dv, layout), _len_stride(kv_len),
            h, n_kv, s_q, s_kv, scale * LOG2E, scale,
            BLOCK_Q=block_q, BLOCK_KV=block_kv, HEAD_DIM=d, PREC=_precision(q), USE_TMA=use_tma,
            MASK_Q=s_q % block_q != 0, VARLEN=kv_len is not None, ATOMIC_DQ=dq_acc is not None,
            DQ_TMA=dq_desc is not None, Q_VARLEN=q_varlen,
            RESUME=p > 0, **cfg)
    return dk, dv


def _backward(do, q, k, v, out, lse2, dlse2, kv_idx, kv_cnt, kv_len, block_q, block_kv, scale, layout,
              one_recompute=False, q_varlen=False):
    """Default: dq over each query block's list, then dk/dv over each KV block's (no atomics,
    bitwise reproducible; P and dP computed twice). Otherwise the one-recompute schedule: one walk
    over each KV block's list (in L2-sized passes over the query span) gives dk, dv and dq, dq added
    in float32 with atomics."""
    do = _unit_last(do)
    if dlse2 is not None:
        dlse2 = dlse2.to(torch.float32).contiguous()  # read as [b*h, Sq] rows
    n_kv = -(-split_dims(k, layout)[1] // block_kv)
    # dk/dv gather query blocks from each head's Q and dO: passes over the query span (see L2_SHARE). The
    # one-recompute schedule also adds into dq's float32 accumulator there: counted as if Q's and dO's
    # elements were twice as wide (right for bf16 and fp16; fp32 gets more passes).
    elem = q.element_size() * (2 if one_recompute else 1)
    passes = _passes(kv_idx.shape[2], block_q, q.shape[-1], elem, q.device)
    q_idx, q_bounds = transpose_block_lists(kv_idx, kv_cnt, n_kv, passes)
    if not one_recompute:
        dq, delta = _dq(do, q, k, v, out, lse2, dlse2, kv_idx, kv_cnt, kv_len, block_q, block_kv, scale, layout,
                        q_varlen)
        dk, dv = _dkdv(do, q, k, v, lse2, delta, q_idx, q_bounds, kv_len, block_q, block_kv, scale, layout, q_varlen)
        return dq, dk, dv
    # delta = rowsum(dO * O) - dlse (per natural-log unit), as the dq kernel computes it.
    delta = (to_bhsd(do, layout).float() * to_bhsd(out, layout).float()).sum(-1)
    if dlse2 is not None:
        delta = delta - dlse2.view_as(delta) * LOG2E
    dq_acc = torch.zeros(delta.shape + (q.shape[-1],), dtype=torch.float32, device=q.device)
    dk, dv = _dkdv(do, q, k, v, lse2, delta.contiguous(), q_idx, q_bounds, kv_len, block_q, block_kv, scale, layout,
                   q_varlen, dq_acc)
    return from_bhsd(dq_acc, layout).contiguous().to(q.dtype), dk, dv


# --------------------------------------------------------------------------------------------
# Custom ops (torch.library): opaque to torch.compile, with fake implementations giving output
# shapes, so a compiled or CUDA-graph-captured step calls the kernels as they are.
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("megatron_dsv::block_sparse_attn_fwd", mutates_args=())
def block_sparse_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor,
                          kv_cnt: torch.Tensor, block_q: int, block_kv: int, scale: float,
                          layout: str, kv_len: Optional[torch.Tensor] = None,
                          q_len: Optional[torch.Tensor] = None,
                          one_recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out contiguous in q's layout, base-2 lse [b, h, Sq] float32). kv_len: int32 [1 or b*h, n_kvblocks]
    valid keys at the start of each KV block, shared by all heads or per (batch, head) (None: all).
    q_len: int32 [n_qblocks] valid rows at the start of each query block (None: all); the others get
    out 0 and lse +inf, so the backward gives them and takes from them no gradient."""
    return _forward(q, k, v, kv_idx, kv_cnt, kv_len, q_len, block_q, block_kv, scale, layout)


@block_sparse_attn_fwd.register_fake
def _(q, k, v, kv_idx, kv_cnt, block_q, block_kv, scale, layout, kv_len=None, q_len=None, one_recompute=False):
    b, s_q, h, _ = split_dims(q, layout)
    return q.new_empty(q.shape), q.new_empty((b, h, s_q), dtype=torch.float32)


@torch.library.custom_op("megatron_dsv::block_sparse_attn_bwd", mutates_args=())
def block_sparse_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse2: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
                          block_q: int, block_kv: int, scale: float, layout: str,
                          dlse2: Optional[torch.Tensor] = None,
                          kv_len: Optional[torch.Tensor] = None,
                          one_recompute: bool = False,
                          q_varlen: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each contiguous in its input's layout. dlse2: gradient of the base-2 lse
    [b, h, Sq] (None: the lse was not used). one_recompute: the one-recompute schedule (dq by
    float32 atomics, not bitwise reproducible). q_varlen: the forward had padding rows (q_len): they
    get zero gradients and give none, whatever q and dO hold there."""
    return _backward(do, q, k, v, out, lse2, dlse2, kv_idx, kv_cnt, kv_len, block_q, block_kv, scale, layout,
                     one_recompute, q_varlen)


@block_sparse_attn_bwd.register_fake
def _(do, q, k, v, out, lse2, kv_idx, kv_cnt, block_q, block_kv, scale, layout, dlse2=None, kv_len=None,
      one_recompute=False, q_varlen=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_idx, kv_cnt, block_q, block_kv, scale, layout, kv_len, q_len, one_recompute = inputs
    out, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2, kv_idx, kv_cnt, kv_len)
    ctx.args = (block_q, block_kv, scale, layout)
    ctx.one_recompute, ctx.q_varlen = one_recompute, q_len is not None
    # Unused outputs give None instead of a zero tensor: no lse gradient is the common case.
    ctx.set_materialize_grads(False)


def _backward_rule(ctx, dout, dlse2):
    q, k, v, out, lse2, kv_idx, kv_cnt, kv_len = ctx.saved_tensors
    if dout is None:  # only the lse was used
        dout = torch.zeros_like(out)
    dq, dk, dv = block_sparse_attn_bwd(dout, q, k, v, out, lse2, kv_idx, kv_cnt, *ctx.args, dlse2, kv_len,
                                       ctx.one_recompute, ctx.q_varlen)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


block_sparse_attn_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def triton_block_sparse_attention(q, k, v, kv_idx, kv_cnt, *, block_q, block_kv, scale, layout,
                                  return_lse, segments=None, kv_lens=None, one_recompute=False):
    """Triton backend of :func:`megatron_dsv.ops.block_sparse_attention` (inputs already validated).

    kv_idx entries must be valid block ids within each count (not re-checked here: that would
    need a host sync); entries past the count are never read. kv_lens: int32 [1 or b*h, n_kv].
    With segments the kernels mask padding keys (by the segments' KV block lengths) and write zeros
    and an lse of +inf on padding rows (by the query block lengths): those rows take part in no
    gradient. The returned lse has -inf there, as for any row without keys.
    """
    d = q.shape[-1]
    _check_supported(q, d)
    q, k, v = (_unit_last(t) for t in (q, k, v))
    kv_idx = kv_idx.to(torch.int32)
    kv_cnt = kv_cnt.to(torch.int32)
    q_lens = None
    if segments is not None and segments.is_padded:
        kv_lens = segments.block_lens(block_kv, q.device).view(1, -1)
        q_lens = segments.block_lens(block_q, q.device)
    out, lse2 = block_sparse_attn_fwd(q, k, v, kv_idx, kv_cnt, block_q, block_kv, float(scale), layout, kv_lens,
                                      q_lens, one_recompute)
    if not return_lse:
        return out
    lse = lse2 * math.log(2.0)
    return out, (lse if q_lens is None else lse.masked_fill(~segments.token_valid(q.device), float("-inf")))
