"""Pure-torch references of the DSV ops: correct on any device, differentiable by autograd.

They are the CPU path and the oracle the Triton kernels are tested against. Work is
proportional to the selected blocks (KV blocks are gathered per query block), so the
reference is also a usable sparse path on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import from_bhsd, seq_dim, to_bhsd

# Bytes of token scores [b, heads, n_q, S_kv] float32 block_scores_reference holds at once.
SCORE_CHUNK_BYTES = 256 << 20


def _pad_seq(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 2 of a [b, h, s, d] tensor to a multiple of `multiple`."""
    pad = (-x.shape[2]) % multiple
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def block_means_reference(x: torch.Tensor, block: int, count=None) -> torch.Tensor:
    """[b, h, n_blocks, r] float32 mean of each block of tokens (dim 2) of x [b, h, s, r]: the sum over the
    block (zero-padded at the end) over count [n_blocks] (default: the tokens it holds, the last block
    cut at s)."""
    x = x.float()
    n = -(-x.shape[2] // block)
    if count is None:
        count = torch.clamp(x.shape[2] - torch.arange(n, device=x.device) * block, max=block)
    return _pad_seq(x, block).unflatten(2, (n, block)).sum(3) / count.view(1, 1, n, 1)


def block_sparse_attention_reference(q, k, v, kv_idx, kv_cnt, *, block_q, block_kv, scale, layout,
                                     return_lse, segments=None, kv_lens=None):
    """Exact softmax attention of each query block over its selected KV blocks.

    Inputs are already validated by :func:`megatron_dsv.ops.block_sparse_attention`.
    Computes in float32 (float64 for float64 inputs); returns out in q's dtype and
    lse [b, h, Sq] float32/float64 (-inf for rows with no keys). With `segments` (packed clips),
    each clip is computed on its own, exactly as an unpacked sequence; padding gets out 0, lse -inf.
    kv_lens: int [1 or b*h, n_kv]: valid keys at the start of each KV block (None: all).
    """
    if segments is not None:
        return _packed_attention_reference(q, k, v, kv_idx, kv_cnt, block_q=block_q, block_kv=block_kv,
                                           scale=scale, layout=layout, return_lse=return_lse,
                                           segments=segments)
    qh, kh, vh = (to_bhsd(t, layout) for t in (q, k, v))
    b, h, s_q, d = qh.shape
    s_kv = kh.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_q = kv_idx.shape[2]
    k_max = kv_idx.shape[3]

    qb = _pad_seq(qh, block_q).to(acc).view(b, h, n_q, block_q, d)
    n_kv = -(-s_kv // block_kv)
    # One block of zeros past the last: slots past a count gather it, so whatever the unselected
    # blocks hold (NaN, Inf) reaches neither the output nor any gradient.
    kb = F.pad(kh.to(acc), (0, 0, 0, (n_kv + 1) * block_kv - s_kv)).view(b, h, n_kv + 1, block_kv, d)
    vb = F.pad(vh.to(acc), (0, 0, 0, (n_kv + 1) * block_kv - s_kv)).view(b, h, n_kv + 1, block_kv, vh.shape[-1])

    # Gather each query block's KV blocks: [b, h, n_q, k_max * block_kv, d].
    slot_valid = torch.arange(k_max, device=q.device) < kv_cnt.unsqueeze(-1).long()
    idx = torch.where(slot_valid, kv_idx.long(), n_kv)
    flat = idx.reshape(b, h, n_q * k_max, 1, 1)
    k_sel = kb.gather(2, flat.expand(-1, -1, -1, block_kv, d)).view(b, h, n_q, k_max * block_kv, d)
    v_sel = vb.gather(2, flat.expand(-1, -1, -1, block_kv, vb.shape[-1]))
    v_sel = v_sel.view(b, h, n_q, k_max * block_kv, vb.shape[-1])

    # A key is valid if its slot is within the count and its token exists (last block may be partial).
    tok = idx.unsqueeze(-1) * block_kv + torch.arange(block_kv, device=q.device)
    key_valid = slot_valid.unsqueeze(-1) & (tok < s_kv)
    if kv_lens is not None:
        lens = kv_lens.long().expand(b * h, n_kv).reshape(b, h, n_kv)
        lens = F.pad(lens, (0, 1)).gather(2, idx.view(b, h, -1))
        key_valid &= torch.arange(block_kv, device=q.device) < lens.view(b, h, n_q, k_max, 1)
        # Keys masked inside selected blocks are replaced, not multiplied by a zero probability.
        masked = ~key_valid.view(b, h, n_q, k_max * block_kv, 1)
        k_sel, v_sel = k_sel.masked_fill(masked, 0.0), v_sel.masked_fill(masked, 0.0)
    key_valid = key_valid.view(b, h, n_q, 1, k_max * block_kv)

    scores = torch.einsum("bhiqd,bhikd->bhiqk", qb, k_sel) * scale
    scores = scores.masked_fill(~key_valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, h, n_q, block_q]; -inf where no key is valid
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0).unsqueeze(-1))
    probs = probs.masked_fill(~key_valid, 0.0)
    out = torch.einsum("bhiqk,bhikd->bhiqd", probs, v_sel)

    out = out.reshape(b, h, n_q * block_q, -1)[:, :, :s_q]
    out = from_bhsd(out.to(q.dtype), layout)
    if not return_lse:
        return out
    return out, lse.reshape(b, h, n_q * block_q)[:, :, :s_q]


def _packed_attention_reference(q, k, v, kv_idx, kv_cnt, *, block_q, block_kv, scale, layout, return_lse,
                                segments):
    """Clip by clip: slice the clip's tokens and its query blocks' lists (ids made clip-relative)."""
    outs, lses = [], []
    for c, (start, length) in enumerate(zip(segments.starts, segments.lengths)):
        q_lo, q_hi = segments.block_range(c, block_q)
        kv_lo = segments.block_range(c, block_kv)[0]
        clip = [t.narrow(seq_dim(layout), start, length) for t in (q, k, v)]
        out, lse = block_sparse_attention_reference(
            *clip, kv_idx[:, :, q_lo:q_hi] - kv_lo, kv_cnt[:, :, q_lo:q_hi], block_q=block_q,
            block_kv=block_kv, scale=scale, layout=layout, return_lse=True)
        outs.append(out)
        lses.append(lse)
    dim = seq_dim(layout)  # padding rows: zero output, lse -inf
    out = segments.scatter(torch.cat(outs, dim=dim), dim)
    return (out, segments.scatter(torch.cat(lses, dim=2), 2, float("-inf"))) if return_lse else out


def block_scores_reference(q_lr, k_lr, *, block_q, block_kv, kv_reduce="max"):
    """Score of every (query block, KV block) pair: [b, h, n_q, n_kv] float32.

    The proxy of a query block is the mean of its tokens' q_lr. A KV block's score is
    the max (kv_reduce="max") over its tokens of proxy . k_lr, or proxy . mean(k_lr)
    (kv_reduce="mean"). Memory is O(n_q x S_kv), never O(S^2).
    """
    qh = to_bhsd(q_lr, "bshd").float()
    kh = to_bhsd(k_lr, "bshd").float()
    b, h, s_q, r = qh.shape
    s_kv = kh.shape[2]
    n_q = -(-s_q // block_q)
    n_kv = -(-s_kv // block_kv)

    proxy = block_means_reference(qh, block_q)

    if kv_reduce == "mean":
        return torch.einsum("bhir,bhjr->bhij", proxy, block_means_reference(kh, block_kv))

    # A few heads at a time keep the [n_q, S_kv] token-score buffer within SCORE_CHUNK_BYTES; all of them
    # at once where it fits (few query blocks: the profiler's sampled cubes), in a handful of launches.
    scores = torch.empty(b, h, n_q, n_kv, device=qh.device, dtype=torch.float32)
    pad = n_kv * block_kv - s_kv
    per_chunk = max(1, SCORE_CHUNK_BYTES // (4 * b * n_q * n_kv * block_kv))
    for h0 in range(0, h, per_chunk):
        heads = slice(h0, h0 + per_chunk)
        tok = torch.einsum("bhir,bhjr->bhij", proxy[:, heads], kh[:, heads])
        tok = F.pad(tok, (0, pad), value=float("-inf"))
        scores[:, heads] = tok.unflatten(-1, (n_kv, block_kv)).amax(-1)
    return scores


def block_sums(probs: torch.Tensor, block_kv: int) -> torch.Tensor:
    """Sum [..., S] per KV block of block_kv consecutive entries -> [..., ceil(S / block_kv)]."""
    s = probs.shape[-1]
    pad = (-s) % block_kv
    if pad:
        probs = F.pad(probs, (0, pad))
    return probs.unflatten(-1, ((s + pad) // block_kv, block_kv)).sum(-1)


def row_block_mass_reference(q: torch.Tensor, k: torch.Tensor, *, scale: float, block_kv: int) -> torch.Tensor:
    """Share of each query row's softmax attention mass in every KV block.

    q [n, b, h, d] (a few rows), k [S, b, h, d] (all keys; the layer's sbhd layout) -> [b, h, n, n_kv]
    float32 (float64 for float64 inputs). Materialises the logits, a few heads at a time
    (SCORE_CHUNK_BYTES): the pure-torch path and the oracle of the Triton kernel (ops/row_mass.py)."""
    n, b, h, _ = q.shape
    s = k.shape[0]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(b, h, n, -(-s // block_kv), device=q.device, dtype=dtype)
    per_chunk = max(1, SCORE_CHUNK_BYTES // max(1, out.element_size() * b * n * s))
    for h0 in range(0, h, per_chunk):
        heads = slice(h0, h0 + per_chunk)
        logits = torch.einsum("nbhd,sbhd->bhns", q[:, :, heads].to(dtype), k[:, :, heads].to(dtype)) * scale
        out[:, heads] = block_sums(torch.softmax(logits, dim=-1), block_kv)
    return out


def cosine_rows_reference(pq: torch.Tensor, pq_g: torch.Tensor, *, scale: float, weight: float) -> tuple:
    """The row terms of LowRankPredictor.gram_loss. pq [..., 2n, d]: n rows P = q W, then the n rows q;
    pq_g: pq @ G for the keys' Gram matrix G. Per row, with |p|^2 = P G P^T, |t|^2 = scale^2 q G q^T and
    p.t = scale P G q^T: (1 - cos [..., n], dL/dP [..., n, d]) of L = weight * sum(1 - cos). As
    F.cosine_similarity, each norm is clamped at eps = 1e-8 (|t| = scale sqrt(q G q^T)), and no product
    of the squared norms is formed (it would overflow float32 first); where |p| is clamped, the norm is
    a constant and dL/dP has no term along P G."""
    n = pq.shape[-2] // 2
    pp, tt = (pq_g * pq).sum(-1).split(n, dim=-1)
    dot = torch.linalg.vecdot(pq_g[..., :n, :], pq[..., n:, :])
    inv_p = torch.rsqrt(pp.clamp_min(1e-16))
    inv_t = torch.rsqrt(tt.clamp_min(1e-16 / scale ** 2))
    cos = dot * inv_p * inv_t
    inv_pp = torch.where(pp > 1e-16, inv_p * inv_p, 0.0)
    coef = torch.cat([cos * inv_pp, -inv_p * inv_t], dim=-1).unsqueeze(-1) * weight
    grad_p = (pq_g * coef).unflatten(-2, (2, n)).sum(dim=-3)
    return 1.0 - cos, grad_p


def topk_blocks(scores: torch.Tensor, budgets: torch.Tensor, k_max: int):
    """Top-`budgets[h]` KV blocks per (batch, head, query block), ids sorted ascending.

    Ties go to the lower block id (stable sort), so selection is deterministic.
    Returns kv_idx [b, h, n_q, k_max] int32 (-1 past the count) and kv_cnt [b, h, n_q] int32.
    """
    b, h, n_q, n_kv = scores.shape
    budgets = budgets.clamp(0, k_max)   # device budgets (select_blocks' k_max) are not checked on the host
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k_max]
    keep = torch.arange(k_max, device=scores.device).view(1, 1, 1, k_max) < budgets.view(1, h, 1, 1)
    ids = torch.where(keep, order, n_kv).sort(dim=-1).values
    kv_idx = torch.where(ids < n_kv, ids, -1).to(torch.int32)
    kv_cnt = budgets.view(1, h, 1).expand(b, h, n_q).to(torch.int32).contiguous()
    return kv_idx, kv_cnt


def select_blocks_reference(q_lr, k_lr, budgets, k_max, *, block_q, block_kv, kv_reduce="max",
                            segments=None, q_start=0):
    """budgets: int64 [h] (or [h, clips] with `segments`), already clipped to the KV blocks.
    With segments, each clip selects among its own KV blocks, exactly as an unpacked sequence;
    query blocks of pure padding select nothing. q_lr holding the window [q_start, q_start + Sq)
    of the packed sequence is placed in a zero sequence of full length, whose rows are then cut."""
    if segments is None:
        scores = block_scores_reference(q_lr, k_lr, block_q=block_q, block_kv=block_kv, kv_reduce=kv_reduce)
        return topk_blocks(scores, budgets.to(scores.device), k_max)
    if q_start or q_lr.shape[1] != segments.total:
        window = slice(q_start // block_q, -(-(q_start + q_lr.shape[1]) // block_q))
        q_full = q_lr.new_zeros(q_lr.shape[0], segments.total, *q_lr.shape[2:])
        q_full[:, q_start:q_start + q_lr.shape[1]] = q_lr
        kv_idx, kv_cnt = select_blocks_reference(q_full, k_lr, budgets, k_max, block_q=block_q,
                                                 block_kv=block_kv, kv_reduce=kv_reduce, segments=segments)
        return kv_idx[:, :, window].contiguous(), kv_cnt[:, :, window].contiguous()
    b, s_q, h, _ = q_lr.shape
    n_q = -(-s_q // block_q)
    kv_idx = torch.full((b, h, n_q, k_max), -1, dtype=torch.int32, device=q_lr.device)
    kv_cnt = torch.zeros((b, h, n_q), dtype=torch.int32, device=q_lr.device)
    for c, (start, length) in enumerate(zip(segments.starts, segments.lengths)):
        q_lo, q_hi = segments.block_range(c, block_q)
        kv_lo = segments.block_range(c, block_kv)[0]
        budget = budgets[:, c]
        idx, cnt = select_blocks_reference(q_lr[:, start:start + length], k_lr[:, start:start + length],
                                           budget, max(int(budget.max()), 1), block_q=block_q,
                                           block_kv=block_kv, kv_reduce=kv_reduce)
        kv_idx[:, :, q_lo:q_hi, :idx.shape[-1]] = torch.where(idx >= 0, idx + kv_lo, -1)
        kv_cnt[:, :, q_lo:q_hi] = cnt
    return kv_idx, kv_cnt


def dense_attention_reference(q, k, v, *, scale, layout, return_lse=False):
    """Plain softmax attention in float32/float64 through explicit matrices (test oracle)."""
    qh, kh, vh = (to_bhsd(t, layout) for t in (q, k, v))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bhqd,bhkd->bhqk", qh.to(acc), kh.to(acc)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), vh.to(acc))
    out = from_bhsd(out.to(q.dtype), layout)
    return (out, lse) if return_lse else out
