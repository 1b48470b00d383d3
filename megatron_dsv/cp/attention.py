"""Distributed attention entry points of the hybrid CP scheme (what DSVDotProductAttention calls).

Stage 2 (sparse):  dsv_cp_attention  = rank-r projections of q, k -> their head all-to-all (and the
                   low-rank keys' gather) -> q, k, v's head all-to-alls started -> selection on the
                   full sequence of the local heads meanwhile -> sparse KV exchange + block-sparse
                   attention -> reverse all-to-all.
Stage 1 (dense):   dense_cp_attention = head all-to-all -> all-gather K, V over the R group ->
                   dense attention -> reverse all-to-all; hands back the local heads' q, k so the
                   predictor and profiler see whole sequences.

Packed clips (``segments`` of the whole packed sequence, clips on block boundaries): ranks hold
whole blocks of it as for one sequence, a clip may span ranks; selection, the exchange's key
masks and dense attention are restricted to each query's own clip, padding rows get zeros.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..ops import dense_attention, select_blocks
from ..ops.segments import check_segments
from .all_to_all import all_gather_ints, check_heads_of, gather_segments, head_to_seq, seq_to_head
from .groups import HybridCPGroup
from .kv_exchange import sparse_kv_attention
from .planner import CPPlan, budget_blocks


def _check_segments(segments, s_local, group, block_q, block_kv):
    if segments is not None:
        check_segments(segments, s_local * group.size, block_q, block_kv)


def _zero_padding(out, segments, group):
    """Zero the padding rows of this rank's shard [s_local, b, H, d]: of the output, whose values
    there are unused, and of q before attention: a padding query row takes part in the exchange's
    attention like any other, and a NaN in it would reach the keys' gradients through 0 x NaN."""
    if segments is None or not segments.is_padded:
        return out
    s_local = out.shape[0]
    valid = segments.token_valid(out.device)[group.index * s_local:(group.index + 1) * s_local]
    return out.masked_fill(~valid.view(-1, 1, 1, 1), 0.0)


def _check_shard(q, k, v, group, U, block_q=None, block_kv=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [s_local, b, heads, d], got {tuple(t.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if group.size % U:
        raise ValueError(f"plan has U={U} but the CP group has {group.size} ranks")
    if U > q.shape[2]:   # (every rank raises: a rank left without heads would fail alone, its peers would wait)
        raise ValueError(f"U={U} head-parallel ranks need at least {U} heads, q has {q.shape[2]}")
    for name, blk in (("block_q", block_q), ("block_kv", block_kv)):
        if blk is not None and q.shape[0] % blk:
            raise ValueError(f"s_local={q.shape[0]} must be a multiple of {name}={blk}: ranks hold whole cubes")


def _to_heads(q, k, v, group, U, heads_of, pending=None):
    """[s_local, b, H, d] x 3 -> [seg, b, n, d] x 3, one all-to-all each. Not one all-to-all of q|k|v
    concatenated: that costs a concatenation forward, and in backward three full-size zero-filled
    gradients of the slices, added up, for one collective's latency saved. With `pending`, the
    all-to-alls are only started (their handles appended), to run while selection does."""
    return tuple(seq_to_head(t, group, U, heads_of, pending) for t in (q, k, v))


def _wait(pending, group, device) -> None:
    with group.phase("a2a", device):   # what the overlap did not hide
        for work in pending:
            work.wait()


def dsv_cp_attention(q, k, v, wq_lr, wk_lr, budgets, *, group: HybridCPGroup, plan: CPPlan, block_q: int,
                     block_kv: int, scale: Optional[float] = None, backend: str = "auto",
                     return_selection: bool = False, segments=None, deterministic: bool = False):
    """Stage-2 sparse attention of this rank's sequence shard under hybrid context parallelism.

    Args:
        q, k, v: [s_local, b, H, d] (sbhd): this CP rank's shard, tokens [c * s_local, (c+1) * s_local)
            of the cube-ordered sequence (c = position in ``group.ranks``); s_local a multiple of
            block_q and block_kv.
        wq_lr, wk_lr: [H, d, r] predictor weights (replicated); selection runs without gradient.
        budgets: [H] per-head budgets over the whole sequence: int block counts or float fractions;
            with segments, int [H, clips] (per head and clip) or [H].
        group, plan: the CP group and this layer's plan (``plan.P == group.size``); a head that the
            plan splits is computed by several ranks, each on its share of the query blocks.
        segments: packed clips (:class:`megatron_dsv.ops.Segments`) of the whole sequence, starting
            on multiples of max(block_q, block_kv).
        backend, deterministic: the attention kernels (:func:`megatron_dsv.ops.block_sparse_attention`).
    Returns out [s_local, b, H, d], differentiable in q, k, v; with return_selection also
    (kv_idx, kv_cnt) of this rank's heads ``plan.heads_of[u]`` and segment (global KV block ids).
    """
    _check_shard(q, k, v, group, plan.U, block_q, block_kv)
    if plan.P != group.size:
        raise ValueError(f"plan is for P={plan.P} ranks but the CP group has {group.size}")
    H, d = q.shape[2], q.shape[3]
    if tuple(wq_lr.shape[:2]) != (H, d) or wk_lr.shape != wq_lr.shape:
        raise ValueError(f"wq_lr and wk_lr must be [heads={H}, d={d}, r], got {tuple(wq_lr.shape)}, "
                         f"{tuple(wk_lr.shape)}")
    _check_segments(segments, q.shape[0], group, block_q, block_kv)
    grid = group.grid(plan.U)
    n_kv = q.shape[0] * group.size // block_kv
    if segments is None:
        blocks = budget_blocks(budgets, n_kv)
    else:
        blocks = torch.as_tensor(budgets)
        if blocks.is_floating_point():
            raise ValueError("with segments, budgets must be int block counts ([H] or [H, clips])")
    if blocks.shape[0] != H:
        raise ValueError(f"budgets for {blocks.shape[0]} heads, the tensors have {H}")
    q = _zero_padding(q, segments, group)
    with torch.no_grad():
        # Selection reads only the rank-r projections. Made here, on this rank's shard and for every
        # head, they cross the head all-to-all (r/d of q and k's bytes) before q, k and v do, so that
        # selection runs while q, k and v are in flight.
        with group.phase("selection", q.device):
            q_lr = torch.einsum("sbhd,hdr->sbhr", q, wq_lr.to(q.dtype))
            k_lr = torch.einsum("sbhd,hdr->sbhr", k, wk_lr.to(k.dtype))
        q_lr, k_lr = (seq_to_head(t, group, plan.U, plan.heads_of) for t in (q_lr, k_lr))   # [seg, b, n, r]
        with group.phase("klr_gather", q.device):
            k_lr = gather_segments(k_lr.contiguous(), group, plan.U)   # [S, b, n, r]
    pending = []
    qh, kh, vh = _to_heads(q, k, v, group, plan.U, plan.heads_of, pending)
    with torch.no_grad(), group.phase("selection", q.device):
        # Budgets indexed by the plan's host-side head list: no device-to-host copy.
        kv_idx, kv_cnt = select_blocks(q_lr.transpose(0, 1), k_lr.transpose(0, 1),
                                       blocks[list(plan.heads_of[grid.u])], block_q=block_q, block_kv=block_kv,
                                       backend=backend, segments=segments,
                                       q_start=grid.j * qh.shape[0] if segments is not None else 0)
        kv_idx, kv_cnt = _keep_share(kv_idx, kv_cnt, plan, grid.u)
    kv_lens = segments.block_lens(block_kv, q.device) if segments is not None and segments.is_padded else None
    _wait(pending, group, q.device)
    out_h = sparse_kv_attention(qh, kh, vh, kv_idx, kv_cnt, group, plan.U, block_q=block_q, block_kv=block_kv,
                                scale=scale, schedule=plan.schedule, backend=backend, kv_lens=kv_lens,
                                deterministic=deterministic)
    out = _zero_padding(head_to_seq(out_h, group, plan.U, plan.heads_of, H), segments, group)
    return (out, (kv_idx, kv_cnt)) if return_selection else out


def _keep_share(kv_idx, kv_cnt, plan: CPPlan, u: int):
    """A head split by the plan: this rank keeps only its share of the segment's query blocks
    (the others get count 0 and ids -1: zero output, no work, nothing requested)."""
    if not plan.shares or all(k == 1 for lo, hi, k in plan.shares[u]):
        return kv_idx, kv_cnt
    n = kv_cnt.shape[2]
    rows = torch.arange(n, device=kv_cnt.device)
    keep = torch.stack([(rows >= lo * n // k) & (rows < hi * n // k) for lo, hi, k in plan.shares[u]]).unsqueeze(0)
    return (torch.where(keep.unsqueeze(-1), kv_idx, torch.full_like(kv_idx, -1)),
            torch.where(keep, kv_cnt, torch.zeros_like(kv_cnt)))


def _dense_window(qh, k_full, v_full, segments, q_start, scale):
    """Dense attention of the queries [q_start, q_start + seg) of a packed sequence, each over its
    own clip's keys of the whole sequence; padding rows get zeros. [seg, b, n, d] -> same."""
    pieces, pos = [], q_start
    for first, n, start, length in segments.window(q_start, q_start + qh.shape[0]):
        if first > pos:
            pieces.append(qh.new_zeros(first - pos, *qh.shape[1:]))
        pieces.append(dense_attention(qh[first - q_start:first - q_start + n], k_full[start:start + length],
                                      v_full[start:start + length], scale=scale, layout="sbhd"))
        pos = first + n
    if pos < q_start + qh.shape[0]:
        pieces.append(qh.new_zeros(q_start + qh.shape[0] - pos, *qh.shape[1:]))
    return torch.cat(pieces)


def dense_cp_attention(q, k, v, *, group: HybridCPGroup, U: int, heads_of=None, scale: Optional[float] = None,
                       return_heads: bool = False, segments=None):
    """Stage-1 dense attention under hybrid context parallelism.

    Args:
        q, k, v: [s_local, b, H, d] (sbhd) shard of this CP rank (as for dsv_cp_attention).
        U: head-parallel size (U = P gives whole sequences per head: pure Ulysses).
        heads_of: head assignment, each head on exactly one rank (default: contiguous chunks,
            uneven when U does not divide H).
        segments: packed clips of the whole sequence (as for dsv_cp_attention): each query attends
            to its own clip only.
    Returns out [s_local, b, H, d], differentiable in q, k, v; with return_heads also
    (heads, q_seg, k_full): this rank's global head ids, its segment's queries [seg, b, n, d]
    and the whole sequence's keys [S, b, n, d] of those heads (detached), for the predictor and profiler.
    """
    _check_shard(q, k, v, group, U)
    _check_segments(segments, q.shape[0], group, 1, 1)
    H = q.shape[2]
    if heads_of is None:
        heads_of = tuple(tuple(h for h in range(H) if h * U // H == u) for u in range(U))
    check_heads_of(heads_of, U, H, partition=True)
    qh, kh, vh = _to_heads(q, k, v, group, U, heads_of)
    kv = gather_segments(torch.cat([kh, vh], dim=-1), group, U)     # [S, b, n, 2d]
    d = q.shape[-1]
    k_full, v_full = kv[..., :d], kv[..., d:]
    if segments is None:
        out_h = dense_attention(qh, k_full, v_full, scale=scale, layout="sbhd")
    else:
        out_h = _dense_window(qh, k_full, v_full, segments, group.grid(U).j * qh.shape[0], scale)
    out = head_to_seq(out_h, group, U, heads_of, H)
    if not return_heads:
        return out
    mine = tuple(heads_of[group.grid(U).u])
    return out, (mine, qh.detach(), k_full.detach())


def allreduce_head_stats(stats: torch.Tensor, group: HybridCPGroup, heads: Optional[torch.Tensor] = None,
                         op: str = "mean") -> torch.Tensor:
    """Make per-head statistics (e.g. profiled sparsity [H]) identical on every CP rank.

    stats: [H] float; a rank contributes only the heads it measured (``heads``; default all). Returns,
    per head, the mean over the ranks that measured it (or their sum with op="sum").
    """
    if op not in ("mean", "sum"):
        raise ValueError(f"op={op!r} is not 'mean' or 'sum'")
    H = stats.shape[0]
    mask = torch.zeros(H, dtype=torch.float64, device=group.device)
    mask[slice(None) if heads is None else heads.to(group.device)] = 1.0
    buf = torch.stack([stats.to(group.device, torch.float64) * mask, mask])
    dist.all_reduce(buf, group=group.group)
    buf = buf.to(stats.device)
    if op == "sum":
        return buf[0].to(stats.dtype)
    if bool((buf[1] == 0).any()):
        raise ValueError("some head was measured by no rank")
    return (buf[0] / buf[1]).to(stats.dtype)


def check_plan_identical(plan: CPPlan, group: HybridCPGroup) -> None:
    """Debug check: every CP rank holds the same plan (compares digests); raises RuntimeError if not."""
    mine = torch.tensor([int(plan.digest(), 16) & ((1 << 62) - 1)], dtype=torch.int64)
    values = all_gather_ints(group, mine)[:, 0].tolist()
    if len(set(values)) != 1:
        raise RuntimeError(f"CP ranks disagree on the plan (digests {values}); budgets differ across ranks?")
