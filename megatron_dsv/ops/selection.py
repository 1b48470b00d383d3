"""select_blocks: the public block-selection entry point and backend dispatch."""

from __future__ import annotations

from typing import Tuple

import torch

from .backend_choice import resolve_backend
from .block_sparse import check_block_sizes
from .reference import select_blocks_reference
from .segments import check_segments

KV_REDUCES = ("max", "mean")


def normalize_budgets(topk, heads: int, n_kv) -> Tuple[torch.Tensor, int]:
    """Budgets as an int64 CPU tensor clipped to [0, n_kv] ([heads] for one sequence, n_kv an int;
    [heads, clips] for packed clips, n_kv a list of each clip's KV blocks) and k_max = max(budgets, 1).
    Ints and sequences of ints are checked and clipped in Python, so a compiled caller
    (torch.compile) traces no data-dependent branch; tensors are read on the host first."""
    clips = None if isinstance(n_kv, int) else len(n_kv)
    caps = [n_kv] if clips is None else list(n_kv)
    shapes = [(heads,)] if clips is None else [(heads,), (heads, clips)]
    expected = " or ".join(f"[{', '.join(map(str, shape))}]" for shape in shapes)
    if isinstance(topk, torch.Tensor):
        if topk.is_floating_point() or topk.dtype == torch.bool:
            raise ValueError(f"topk must be an int or an int tensor {expected}, got a {topk.dtype} tensor")
        if tuple(topk.shape) not in shapes:
            raise ValueError(f"topk tensor must have shape {expected} (heads={heads}), got {tuple(topk.shape)}")
        topk = topk.detach().cpu().tolist()
    if isinstance(topk, int) and not isinstance(topk, bool):
        rows = [[topk] * len(caps)] * heads
    elif isinstance(topk, (list, tuple)) and len(topk) == heads:
        rows = [[t] * len(caps) if not isinstance(t, (list, tuple)) else list(t) for t in topk]
    else:
        raise ValueError(f"topk must be an int, a sequence of ints or an int tensor {expected} (heads={heads}), "
                         f"got {type(topk).__name__}")
    if any(len(r) != len(caps) for r in rows) or any(isinstance(x, bool) or not isinstance(x, int)
                                                      for r in rows for x in r):
        raise ValueError(f"topk must hold ints in shape {expected} (heads={heads}), got {topk!r:.80}")
    if any(x < 0 for r in rows for x in r):
        raise ValueError(f"topk must be >= 0, got {topk!r:.80}")
    rows = [[min(x, cap) for x, cap in zip(r, caps)] for r in rows]
    k_max = max(1, max(max(r) for r in rows))
    budgets = torch.tensor([r[0] for r in rows] if clips is None else rows, dtype=torch.int64)
    return budgets, k_max


def select_blocks(q_lr, k_lr, topk, *, block_q, block_kv, backend="auto", kv_reduce="max", segments=None,
                  q_start=0, k_max=None):
    """Pick the top-k KV blocks of every query block from low-rank projections.

    Args:
        q_lr: [b, Sq, h, r] per-token low-rank queries (bshd).
        k_lr: [b, Skv, h, r] per-token low-rank keys.
        topk: int, or ints [h] (a sequence or an int tensor) of per-head budgets; clipped to the number
            of KV blocks. Ints and sequences compile under torch.compile(fullgraph=True) without breaks.
            With segments, also [h, clips] (per head and clip); each clip's budget is clipped to
            its own KV blocks.
        kv_reduce: "max" (default; a KV block scores the max over its tokens of proxy . k_lr)
            or "mean" (proxy . mean of the block's k_lr, the pooled baseline).

        segments: packed clips (:class:`megatron_dsv.ops.Segments`): each query block selects
            among the KV blocks of its own clip only, as if its clip were alone; query blocks of
            pure padding select nothing. k_lr holds the whole packed sequence.
        q_start: with segments, q_lr may hold only the tokens [q_start, q_start + Sq) of the packed
            sequence (a multiple of block_q; one context-parallel rank's share): the result then has
            the rows of those query blocks.
        k_max: with topk an int tensor [h] on q_lr's device, the budgets stay there: the host never
            reads them (no sync), and a CUDA graph or compiled graph that ran this call runs again
            with whatever values the tensor then holds. k_max (the last dimension of kv_idx) is then
            given; budgets outside [0, k_max] are clipped to it on the device (not reported: that
            would need a host sync), so kv_cnt never exceeds kv_idx's width. Not with segments.

    The proxy of a query block is the mean of its tokens' q_lr. Ties go to the lower block id.

    Returns (kv_idx [b, h, n_q, k_max] int32, ids ascending, -1 past the count;
    kv_cnt [b, h, n_q] int32), with k_max = max budget.
    """
    if q_lr.dim() != 4 or k_lr.dim() != 4:
        raise ValueError(f"q_lr and k_lr must be [b, S, heads, r], got {tuple(q_lr.shape)}, {tuple(k_lr.shape)}")
    b, s_q, h, r = q_lr.shape
    if k_lr.shape[0] != b or k_lr.shape[2] != h or k_lr.shape[3] != r:
        raise ValueError(f"k_lr {tuple(k_lr.shape)} must match q_lr {tuple(q_lr.shape)} in batch, heads, rank")
    if q_lr.device != k_lr.device:
        raise ValueError("q_lr and k_lr must be on one device")
    if not (q_lr.is_floating_point() and k_lr.is_floating_point()):
        raise ValueError(f"q_lr and k_lr must be floating point, got {q_lr.dtype} and {k_lr.dtype}")
    if min(b, s_q, h, r, k_lr.shape[1]) < 1:
        raise ValueError(f"q_lr {tuple(q_lr.shape)} and k_lr {tuple(k_lr.shape)} need at least one batch element, "
                         "token, head and rank")
    check_block_sizes(block_q, block_kv)
    if kv_reduce not in KV_REDUCES:
        raise ValueError(f"kv_reduce={kv_reduce!r} is not one of {list(KV_REDUCES)}")
    n_kv = -(-k_lr.shape[1] // block_kv)
    if segments is None and q_start:
        raise ValueError("q_start is for packed clips (segments): without them queries have no position")
    if segments is not None:
        check_segments(segments, k_lr.shape[1], block_q, block_kv)
        if isinstance(q_start, bool) or not isinstance(q_start, int):
            raise ValueError(f"q_start must be an int, got {q_start!r}")
        if q_start % block_q or q_start < 0 or q_start + s_q > k_lr.shape[1]:
            raise ValueError(f"q_lr holds tokens [{q_start}, {q_start + s_q}) of the packed sequence of "
                             f"{k_lr.shape[1]} tokens; they must lie in it and start on a query block (block_q={block_q})")
        n_kv = list(segments.blocks_per_clip(block_kv))
    if k_max is None:
        budgets, k_max = normalize_budgets(topk, h, n_kv)
    else:
        budgets = topk
        if segments is not None:
            raise ValueError("k_max (budgets kept on the device) is not for packed clips (segments)")
        if not isinstance(topk, torch.Tensor) or topk.device != q_lr.device or tuple(topk.shape) != (h,) \
                or topk.is_floating_point() or topk.dtype == torch.bool:
            raise ValueError(f"with k_max, topk must be an int tensor [{h}] on {q_lr.device}, got "
                             f"{type(topk).__name__} {getattr(topk, 'dtype', '')} {tuple(getattr(topk, 'shape', ()))}")
        if isinstance(k_max, bool) or not isinstance(k_max, int) or not 1 <= k_max <= n_kv:
            raise ValueError(f"k_max must be an int in [1, KV blocks={n_kv}], got {k_max!r}")

    backend = resolve_backend(backend, q_lr.device)
    if backend == "reference":
        fn = select_blocks_reference
    else:
        from .triton_selection import triton_select_blocks as fn
    return fn(q_lr, k_lr, budgets, k_max, block_q=block_q, block_kv=block_kv, kv_reduce=kv_reduce,
              segments=segments, q_start=q_start)
