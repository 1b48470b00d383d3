"""Fused block selection in Triton: score every (query block, KV block) pair, then top-k per head.

Scoring (kv_reduce="max"): one program takes a tile of query-block proxies (the mean of each
block's q_lr, computed exactly as the reference does) and streams all of k_lr through it, BLOCK_N
tokens at a time; the [proxies x tokens] products are reduced to a max per KV block in registers,
so only the [n_q, n_kv] block scores reach memory, never [n_q, S_kv] or [S, S].
The kernel stores each score as an int64 key (order-preserving float bits << 32 | (n_kv-1-id)),
so the top-k over unique keys (a threshold search per row in registers, _top_blocks_kernel) gives
the reference's order, ties going to the lower id, with no host sync.
kv_reduce="mean" scores proxy . mean(k_lr) per block: one small batched matmul, O(n_q x n_kv).
Block means (the proxies, and mean(k_lr)) are one launch of _block_means_kernel, not the five small
torch ops of the reference's formula (each a node a CUDA-graph replay launches).
Packed clips (segments): proxies average only a block's valid rows, each query block scores only
the keys of its own clip (a tile of query blocks streams the union of its clips' keys), and a row
of keys holds only its clip's blocks (as many entries as the largest clip has blocks, the rest a
-inf key), so the top-k and the key buffer scale with the largest clip, not the whole packing.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import check_interpreted_dtype


# Per-head budget tensors kept on the device, keyed by (budgets, device): a step captured in a
# CUDA graph then reads a persistent buffer instead of a host-to-device copy baked into the graph.
_BUDGET_CACHE: dict = {}

# Precision of the proxy . k_lr products on the GPU when k_lr is not bf16. "tf32x3" (three tf32
# tensor-core products, near-float32 accuracy) picked the same blocks as "ieee" float32 FMAs in
# 99.99-100% of the rows on H100 at 64k tokens and ran 2.4x faster (0.61 vs 1.49 ms); plain "tf32"
# changed 4-11% of the rows. bf16 k_lr (what a layer passes) takes "bf16x3": float32-accurate
# scores from three bf16 products.
SCORE_PRECISION = "tf32x3"

# Launch-config overrides for bench/kernels.py and tests (keys: "top_blocks_warps", "score_precision",
# "score_qb", "score_block_n", "score_warps", "score_spans", "means_cols", "means_warps", "score_part_rows").
CONFIG_OVERRIDE: dict = {}


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel output; tests replace it to poison outputs."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _block_means_kernel(X, Count, Out, sx_b, sx_s, sx_h, sx_r, H, S, N_B, R,
                        BLOCK: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr, COUNTED: tl.constexpr):
    """Program (i, b, c): the float32 mean of tokens [i * BLOCK, (i + 1) * BLOCK) of x [b, s, h, r] (any
    strides) over the c-th group of COLS of its (head, rank) columns -> Out[b, head, i, :], summing ROWS
    tokens at a time. The divisor is Count[i] (COUNTED: valid tokens of a packed block, whose padding
    rows are zero) or the tokens the block holds (the last one cut at S)."""
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    col = tl.program_id(2) * COLS + tl.arange(0, COLS)
    col_ok = col < H * R
    head = (col // R).to(tl.int64)
    rank = col % R
    base = X + b * sx_b + head * sx_h + rank * sx_r
    total = tl.zeros([COLS], tl.float32)
    for r0 in tl.static_range(0, BLOCK, ROWS):
        rows = i * BLOCK + r0 + tl.arange(0, ROWS)
        x = tl.load(base[None, :] + rows[:, None].to(tl.int64) * sx_s,
                    mask=(rows < S)[:, None] & col_ok[None, :], other=0.0)
        total += tl.sum(x.to(tl.float32), 0)
    if COUNTED:
        count = tl.load(Count + i)
    else:
        count = tl.minimum(S - i * BLOCK, BLOCK).to(tl.float32)
    tl.store(Out + ((b * H + head) * N_B + i) * R + rank, total / count, mask=col_ok)


@triton.jit
def _block_score_keys_kernel(Proxy, K, Keys, KvRange,
                             sk_b, sk_s, sk_h, sk_r,
                             H, N_Q, N_KV, S_KV, R, W, SPAN,
                             QB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KV: tl.constexpr,
                             R_PAD: tl.constexpr, PREC: tl.constexpr, RANGED: tl.constexpr,
                             SPLIT: tl.constexpr):
    """Program (i, bh, t) scores query blocks i*QB.. of one (batch, head); with SPLIT only against the
    key tokens [t * SPAN, (t + 1) * SPAN) (SPAN a multiple of BLOCK_N): each span writes its own
    entries. Keys rows hold W entries. RANGED: query block i scores only key tokens [KvRange[i, 0],
    KvRange[i, 1]) (a block-aligned start), and entry j of its row is the block KvRange[i, 0] /
    BLOCK_KV + j; otherwise entry j is block j (W = N_KV).
    PREC "bf16x3" (k_lr in bf16): the float32 proxy is split into three bf16 parts whose sum is
    exactly the proxy (for magnitudes in bf16's normal range, as proxies of bf16 q_lr are), so three
    bf16 products, each exact in float32, give float32-accurate scores (accumulated by the tensor
    cores in their own order)."""
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    NB: tl.constexpr = BLOCK_N // BLOCK_KV

    offs_i = pid_q * QB + tl.arange(0, QB)
    offs_r = tl.arange(0, R_PAD)
    i_ok = offs_i < N_Q
    r_ok = offs_r < R
    proxy = tl.load(Proxy + (bh.to(tl.int64) * N_Q + offs_i[:, None]) * R + offs_r[None, :],
                    mask=i_ok[:, None] & r_ok[None, :], other=0.0)
    if PREC == "bf16x3":
        p_hi = proxy.to(tl.bfloat16)
        rest = proxy - p_hi.to(tl.float32)
        p_mid = rest.to(tl.bfloat16)
        p_lo = (rest - p_mid.to(tl.float32)).to(tl.bfloat16)
    k_base = K + b * sk_b + h * sk_h
    key_base = Keys + (bh.to(tl.int64) * N_Q + offs_i[:, None]) * W
    offs_n = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, NB)
    lo_tok = 0
    hi_tok = S_KV
    first = tl.zeros([QB], tl.int32)
    if RANGED:
        row_lo = tl.load(KvRange + offs_i * 2, mask=i_ok, other=0)
        row_hi = tl.load(KvRange + offs_i * 2 + 1, mask=i_ok, other=0)
        live = row_lo < row_hi  # query blocks of pure padding score nothing
        lo_tok = tl.min(tl.where(live, row_lo, S_KV), 0) // BLOCK_N * BLOCK_N
        hi_tok = tl.max(tl.where(live, row_hi, 0), 0)
        first = row_lo // BLOCK_KV
    if SPLIT:
        span_lo = tl.program_id(2) * SPAN
        if RANGED:
            lo_tok = tl.maximum(lo_tok, span_lo)
        else:
            lo_tok = span_lo
        hi_tok = tl.minimum(hi_tok, span_lo + SPAN)
    for start in range(lo_tok, hi_tok, BLOCK_N):
        tok = start + offs_n
        t_ok = tok < S_KV
        k = tl.load(k_base + tok[:, None].to(tl.int64) * sk_s + offs_r[None, :] * sk_r,
                    mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        if PREC == "bf16x3":  # smallest part first: the float32 accumulation rounds least
            kt = tl.trans(k)
            s = tl.dot(p_hi, kt, tl.dot(p_mid, kt, tl.dot(p_lo, kt)))
        else:
            s = tl.dot(proxy, tl.trans(k.to(tl.float32)), input_precision=PREC)
        if RANGED:
            s = tl.where((tok[None, :] >= row_lo[:, None]) & (tok[None, :] < row_hi[:, None]), s, float("-inf"))
        else:
            s = tl.where(t_ok[None, :], s, float("-inf"))
        score = tl.max(tl.reshape(s, (QB, NB, BLOCK_KV)), 2)
        score = tl.where(score == 0.0, 0.0, score)  # -0.0 and +0.0 must tie, as in a float sort
        bits = score.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # integer order == float order
        blk = start // BLOCK_KV + offs_j
        key = (ordered.to(tl.int64) << 32) | (N_KV - 1 - blk)[None, :].to(tl.int64)
        col = blk[None, :] - first[:, None]
        tl.store(key_base + col, key, mask=i_ok[:, None] & (blk < N_KV)[None, :] & (col >= 0) & (col < W))


@triton.jit
def _top_blocks_kernel(Keys, Counts, KvIdx, KvCnt, sc_h, sc_q, H, N_Q, W, N_KV, K_MAX,
                       W_PAD: tl.constexpr, K_PAD: tl.constexpr):
    """One row of keys (a query block of one head) -> the ids of its `count` largest keys, ascending,
    then -1 up to K_MAX. No sort: a binary search over the scores' order bits (the keys' high words,
    32 halvings, each a count over the row) finds the count-th largest score t; the row then takes
    every entry above t and, of those equal to t, the first ones in row order (entries are in
    ascending block order, so the lower ids win ties, as the keys' low words say). The ids are
    written in row order by a prefix sum, so nothing but the result goes through memory."""
    row = tl.program_id(0).to(tl.int64)
    q = row % N_Q
    h = (row // N_Q) % H
    # Budgets kept on the device are not checked on the host (select_blocks' k_max): clipped here to the row.
    cnt = tl.minimum(tl.maximum(tl.load(Counts + h * sc_h + q * sc_q).to(tl.int32), 0), K_MAX)
    offs = tl.arange(0, W_PAD)
    in_row = offs < W
    keys = tl.load(Keys + row * W + offs, mask=in_row, other=0)
    order = (keys >> 32).to(tl.int32)
    lo = tl.full((), -2147483648, tl.int64)  # the largest t with count(order >= t) >= cnt lies in [lo, hi]
    hi = tl.full((), 2147483647, tl.int64)
    for _ in tl.static_range(32):
        mid = (lo + hi + 1) >> 1
        n_ge = tl.sum((in_row & (order >= mid.to(tl.int32))).to(tl.int32), 0)
        ok = n_ge >= cnt
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    t = lo.to(tl.int32)
    above = in_row & (order > t)
    tied = in_row & (order == t)
    need = cnt - tl.sum(above.to(tl.int32), 0)
    # A row of padding (count 0) takes nothing: t is then the largest order, above nothing, need 0.
    take = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= need))
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    ids = (N_KV - 1 - (keys & 0xFFFFFFFF)).to(tl.int32)
    out = KvIdx + row * K_MAX
    tl.store(out + pos, ids, mask=take & (pos < K_MAX))
    slots = tl.arange(0, K_PAD)
    tl.store(out + slots, tl.full([K_PAD], -1, tl.int32), mask=(slots >= cnt) & (slots < K_MAX))
    tl.store(KvCnt + row, cnt)


# Rows longer than this (KV blocks; 1M tokens at block_kv 64) go through torch.topk and a sort.
TOP_BLOCKS_MAX_WIDTH = 16384


def _top_blocks_warps(w_pad: int) -> int:
    """Replayed from CUDA graphs on H200 (10% of the blocks): 256 keys per row (16k tokens, 8 heads) 1 warp
    13.4 us, 4 warps 20.4; 1024 keys (64k, 16 heads) 4 warps 0.240 ms, 1 warp 0.312, 8 warps 0.347
    (bench/results/sel_h200/s15/). Eagerly, 4 warps were fastest at 2048 and 4096 keys too (1.08 / 4.9 ms;
    sel_tune_*.json, tune_sel_r32_262144.json). Longer rows (unmeasured) keep at most 32 keys per thread."""
    return max(1, w_pad // 256) if w_pad < 1024 else min(16, max(4, w_pad // 1024))


def _top_blocks(keys: torch.Tensor, counts: torch.Tensor, k_max: int, n_kv: int):
    """kv_idx [b, h, n_q, k_max] int32 (ascending, -1 past the count), kv_cnt [b, h, n_q] int32 of
    keys [b, h, n_q, W] and counts [h, 1] or [h, n_q]."""
    b, h, n_q, w = keys.shape
    if w > TOP_BLOCKS_MAX_WIDTH or not keys.is_contiguous():
        kv_cnt = counts.clamp(0, k_max).unsqueeze(0).expand(b, h, n_q)
        top = torch.topk(keys, k_max, dim=-1).values  # descending, keys are unique
        ids = n_kv - 1 - (top & 0xFFFFFFFF)
        keep = torch.arange(k_max, device=keys.device) < kv_cnt.unsqueeze(-1)
        ids = torch.where(keep, ids, n_kv).sort(dim=-1).values
        return torch.where(ids < n_kv, ids, -1).to(torch.int32), kv_cnt.to(torch.int32).contiguous()
    kv_idx = _empty((b, h, n_q, k_max), torch.int32, keys.device)
    kv_cnt = _empty((b, h, n_q), torch.int32, keys.device)
    w_pad = max(16, triton.next_power_of_2(w))
    _top_blocks_kernel[(b * h * n_q,)](
        keys, counts, kv_idx, kv_cnt, counts.stride(0), counts.stride(1) if counts.shape[1] > 1 else 0,
        h, n_q, w, n_kv, k_max, W_PAD=w_pad, K_PAD=max(16, triton.next_power_of_2(k_max)),
        num_warps=CONFIG_OVERRIDE.get("top_blocks_warps", _top_blocks_warps(w_pad)))
    return kv_idx, kv_cnt


def _block_counts(s: int, block: int, valid: Optional[torch.Tensor], device) -> torch.Tensor:
    """Tokens counted in each block: valid ones with packed clips, else all (the last block cut
    at s); at least 1 so that a block of pure padding divides by 1."""
    if valid is not None:
        return valid.to(device=device, dtype=torch.float32).clamp(min=1.0)
    n = -(-s // block)
    return torch.clamp(s - torch.arange(n, device=device) * block, max=block)


def _block_means(x, block, count=None):
    """[b, h, n_blocks, r] float32 mean of each block of x [b, s, h, r] (block_means_reference, its
    sum in the kernel's order; padding rows of packed clips are zero, so a sum over the block divided
    by count, its valid rows)."""
    b, s, h, r = x.shape
    n_b = -(-s // block)
    out = _empty((b, h, n_b, r), torch.float32, x.device)
    counted = count is not None
    # One head's columns per program (at least 16): `small` at 16k tokens (8 heads, rank 32, H200, replayed
    # from a CUDA graph) 8.9 us with 2048 such programs, 15.9 us with 256 reading all heads of a block.
    cols = CONFIG_OVERRIDE.get("means_cols", max(16, triton.next_power_of_2(r)))
    _block_means_kernel[(n_b, b, triton.cdiv(h * r, cols))](
        x, _block_counts(s, block, count, x.device) if counted else out, out, *x.stride(), h, s, n_b, r,
        BLOCK=block, COLS=cols, ROWS=min(block, 8192 // cols), COUNTED=counted,
        num_warps=CONFIG_OVERRIDE.get("means_warps", 2))
    return out


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is the scores' order, ties going to the lower block id."""
    n_kv = scores.shape[-1]
    scores = torch.where(scores == 0.0, 0.0, scores)
    bits = scores.view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()
    return (ordered << 32) | (n_kv - 1 - torch.arange(n_kv, device=scores.device))


# Key of a -inf score (block id part 0): entries of a packed row past its clip's blocks.
_NEG_INF_KEY = int(_order_keys(torch.full((1,), float("-inf")))[0])


# Bytes of score keys the selection holds at once. The keys of all (query block, KV block) pairs grow with
# the square of the sequence: [b, h, n_q, n_kv] int64, for 16 heads at blocks of 64 x 64 134 MB at 64k
# tokens, 2.1 GB at 256k and 8.6 GB at 512k, beside the activations of the layer. Past this budget the
# query blocks are scored and picked in parts of whole scoring tiles, each part's keys freed before the
# next's are made; the parts' results are the whole's exactly (each row's keys and top-k are its own). The
# parts' block lists are joined at the end, so those (4 bytes per kept pair: 5% of the keys' bytes at 10%)
# are held twice for a moment.
SCORE_KEYS_BYTES = 1 << 30
PART_ROWS = 64   # a part holds whole scoring tiles (at most 64 query blocks each)
# Bytes per entry while a part's keys are made: the "max" kernel writes the int64 keys; "mean" goes through
# float32 scores and the int32 / int64 steps of _order_keys, about 28 bytes of temporaries at once.
KEY_BYTES = {"max": 8, "mean": 28}


def _rows_per_part(entries_per_row: int, n_q: int, key_bytes: int = KEY_BYTES["max"]) -> int:
    """Query blocks per part of the selection: all of them where their entries (entries_per_row each: batch
    x heads x row width, key_bytes each) fit SCORE_KEYS_BYTES (CONFIG_OVERRIDE "score_part_rows" sets it)."""
    if "score_part_rows" in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE["score_part_rows"]
    fit = SCORE_KEYS_BYTES // (key_bytes * max(entries_per_row, 1))
    return n_q if fit >= n_q else max(PART_ROWS, fit // PART_ROWS * PART_ROWS)


# Key spans: a span holds at least this many scoring steps (BLOCK_N keys each).
MIN_SPAN_STEPS = 8


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _score_spans(tiles: int, s_kv: int, block_n: int, device: torch.device) -> int:
    """Key spans per tile of query blocks, one program each: at least two programs per SM, spans of at
    least MIN_SPAN_STEPS steps. Short sequences give fewer tiles than the GPU has SMs. Replayed from CUDA
    graphs on H200 (bench/results/sel_h200/s15/), `small`'s layer at 16k tokens (8 heads, batch 1, rank 32:
    32 tiles on 132 SMs) scored in 88.4 us with one span, 44.8 / 25.8 / 21.1 us with 2 / 4 / 8; at 64k
    (16 heads, 256 tiles) 468 us with one, 451 with 2, 448 with 4. Off the GPU: one span."""
    if device.type != "cuda":
        return 1
    return max(1, min(-(-2 * _sm_count(device) // tiles), s_kv // (MIN_SPAN_STEPS * block_n)))


def _score_keys_max(proxy, k_lr, block_kv, kv_range, width):
    b, h, n_q, r = proxy.shape
    s_kv = k_lr.shape[1]
    n_kv = -(-s_kv // block_kv)
    if kv_range is None:
        keys = _empty((b, h, n_q, n_kv), torch.int64, proxy.device)
    else:  # entries a row's clip does not fill keep a -inf key: never among its top `count`
        keys = torch.full((b, h, n_q, width), _NEG_INF_KEY, dtype=torch.int64, device=proxy.device)
    r_pad = max(16, triton.next_power_of_2(r))
    # The interpreter's bf16 arithmetic is wrong, so off the GPU bf16 keys go through tf32x3 too.
    prec = CONFIG_OVERRIDE.get("score_precision",
                               "bf16x3" if k_lr.dtype == torch.bfloat16 and k_lr.is_cuda else SCORE_PRECISION)
    # bf16x3: 64 query blocks per program and 256 keys per step (H200, 16 heads, block_kv 64; rank 16 at
    # 64k: 0.38 ms against 0.41 with 128 keys, 0.76 with 32 query blocks and 0.54 with 128; rank 32:
    # 0.47 against 0.52 ms at 64k, 7.0 against 7.3 at 256k). Packed clips and other precisions (not
    # timed so) keep 32 query blocks and 128 keys.
    fast = prec == "bf16x3" and kv_range is None
    qb = min(64, max(16, triton.next_power_of_2(n_q))) if fast else (32 if n_q > 16 else 16)
    block_n = max(block_kv, 256 if fast else 128)
    qb = CONFIG_OVERRIDE.get("score_qb", qb)
    block_n = CONFIG_OVERRIDE.get("score_block_n", block_n)
    tiles = triton.cdiv(n_q, qb) * b * h
    spans = CONFIG_OVERRIDE.get("score_spans", _score_spans(tiles, s_kv, block_n, proxy.device))
    span = triton.cdiv(triton.cdiv(s_kv, spans), block_n) * block_n
    _block_score_keys_kernel[(triton.cdiv(n_q, qb), b * h, triton.cdiv(s_kv, span))](
        proxy.contiguous(), k_lr, keys, keys if kv_range is None else kv_range, *k_lr.stride(),
        h, n_q, n_kv, s_kv, r, keys.shape[-1], span, QB=qb, BLOCK_N=block_n, BLOCK_KV=block_kv, R_PAD=r_pad,
        PREC=prec, RANGED=kv_range is not None, SPLIT=span < s_kv,
        num_warps=CONFIG_OVERRIDE.get("score_warps", 4), num_stages=3)
    return keys


def _score_keys_mean(proxy, k_means, block_kv, kv_range, width):
    """Keys of proxy . mean(k_lr) (k_means: _block_means of k_lr, [b, h, n_kv, r])."""
    n_kv = k_means.shape[2]
    keys = _order_keys(torch.einsum("bhir,bhjr->bhij", proxy, k_means))
    if kv_range is None:
        return keys
    # Row i of a packed sequence: its clip's blocks kv_range[i, 0] / block_kv + j, j < width.
    lo, hi = (kv_range[:, 0] // block_kv).long(), (-(-kv_range[:, 1] // block_kv)).long()
    cols = lo[:, None] + torch.arange(width, device=keys.device)
    inside = cols < hi[:, None]
    picked = keys.gather(-1, cols.clamp(max=n_kv - 1).expand(*keys.shape[:2], -1, -1))
    return torch.where(inside, picked, _NEG_INF_KEY)


def _device_counts(budgets: torch.Tensor, segments, block_q: int, device) -> torch.Tensor:
    """Count of each (head, query block) on the device: [h, 1] (one budget per head) or, for packed
    clips, [h, n_q] (its clip's budget; 0 for query blocks of pure padding)."""
    if budgets.device == device and segments is None:   # budgets the caller keeps on the device
        return budgets.view(-1, 1)
    key = (tuple(budgets.flatten().tolist()), tuple(budgets.shape), segments, block_q, str(device))
    if key not in _BUDGET_CACHE:
        if segments is None:
            counts = budgets.view(-1, 1)
        else:
            clip = segments.block_clip(block_q)
            counts = torch.where(clip >= 0, budgets[:, clip.clamp(min=0)], 0)
        _BUDGET_CACHE[key] = counts.to(device)
    return _BUDGET_CACHE[key]


@torch.library.custom_op("megatron_dsv::select_blocks", mutates_args=())
def select_blocks_op(q_lr: torch.Tensor, k_lr: torch.Tensor, counts: torch.Tensor, k_max: int, block_q: int,
                     block_kv: int, kv_reduce: str, kv_range: Optional[torch.Tensor] = None,
                     q_valid: Optional[torch.Tensor] = None, kv_valid: Optional[torch.Tensor] = None,
                     clip_blocks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom op (torch.library) of the selection: opaque to torch.compile, shapes from the fake.

    counts: int64 [h, 1] or [h, n_q] blocks to keep per (head, query block). Packed clips add
    kv_range (int32 [n_q, 2] key tokens each query block may score), q_valid / kv_valid (valid
    tokens per query / KV block) and clip_blocks (KV blocks of the largest clip): the top-k then
    runs over rows of clip_blocks entries instead of all KV blocks."""
    n_kv = -(-k_lr.shape[1] // block_kv)
    proxy = _block_means(q_lr, block_q, q_valid)
    k_means = _block_means(k_lr, block_kv, kv_valid) if kv_reduce == "mean" else None
    b, h, n_q, _ = proxy.shape
    # ("mean" scores every KV block of a row before it keeps its clip's)
    rows = _rows_per_part(b * h * (clip_blocks if kv_range is not None and kv_reduce == "max" else n_kv), n_q,
                          KEY_BYTES[kv_reduce])
    parts = []
    for r0 in range(0, n_q, rows):   # one part, but where the score keys would outgrow SCORE_KEYS_BYTES
        part = slice(r0, r0 + rows)
        ranges = None if kv_range is None else kv_range[part]
        if kv_reduce == "max":
            keys = _score_keys_max(proxy[:, :, part], k_lr, block_kv, ranges, clip_blocks)
        else:
            keys = _score_keys_mean(proxy[:, :, part], k_means, block_kv, ranges, clip_blocks)
        parts.append(_top_blocks(keys, counts[:, part] if counts.shape[1] > 1 else counts, k_max, n_kv))
        del keys   # freed before the next part's are made
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)


@select_blocks_op.register_fake
def _(q_lr, k_lr, counts, k_max, block_q, block_kv, kv_reduce, kv_range=None, q_valid=None, kv_valid=None,
      clip_blocks=0):
    b, s_q, h, _ = q_lr.shape
    n_q = -(-s_q // block_q)
    return (q_lr.new_empty((b, h, n_q, k_max), dtype=torch.int32),
            q_lr.new_empty((b, h, n_q), dtype=torch.int32))


def triton_select_blocks(q_lr, k_lr, budgets, k_max, *, block_q, block_kv, kv_reduce, segments=None, q_start=0):
    """Triton backend of :func:`megatron_dsv.ops.select_blocks` (inputs already validated).

    budgets: int64 CPU tensor [h] ([h, clips] with segments), already clipped to the KV blocks,
    k_max = max(budgets.max(), 1); or an int tensor [h] on q_lr's device, k_max at least its largest.
    q_lr holds tokens [q_start, q_start + Sq) of the segments' sequence: the per-query-block tables
    are cut to its query blocks.
    Returns kv_idx [b, h, n_q, k_max] int32 (ascending, -1 past the count), kv_cnt [b, h, n_q] int32.
    """
    check_interpreted_dtype(q_lr.dtype, k_lr.dtype)
    device = q_lr.device
    counts = _device_counts(budgets, segments, block_q, device)
    packed = {}
    if segments is not None:
        s_q = q_lr.shape[1]
        rows = slice(q_start // block_q, -(-(q_start + s_q) // block_q))
        if segments.is_padded:  # padding may hold anything finite; proxies and means must not see it
            pad = ~segments.token_valid(device)
            q_lr = q_lr.masked_fill(pad[q_start:q_start + s_q].view(1, -1, 1, 1), 0.0)
            if kv_reduce == "mean":  # "max" scores only each row's clip tokens (the kernel's range mask)
                k_lr = k_lr.masked_fill(pad.view(1, -1, 1, 1), 0.0)
        counts = counts[:, rows]
        packed = dict(kv_range=segments.kv_token_range(block_q, device)[rows],
                      q_valid=segments.block_lens(block_q, device)[rows],
                      kv_valid=segments.block_lens(block_kv, device), clip_blocks=max(segments.blocks_per_clip(block_kv)))
    return select_blocks_op(q_lr, k_lr, counts, int(k_max), block_q, block_kv, kv_reduce, **packed)
