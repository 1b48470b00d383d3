"""select_blocks: the public block-selection entry point and backend dispatch."""

from __future__ import annotations

import torch

from .block_sparse import check_block_sizes, resolve_backend
from .reference import select_blocks_reference

KV_REDUCES = ("max", "mean")


def normalize_budgets(topk, heads: int, n_kv) -> torch.Tensor:
    """Budgets as an int64 CPU tensor clipped to [0, n_kv]: [heads] for one sequence (n_kv an
    int), [heads, clips] for packed clips (n_kv a list: KV blocks of each clip)."""
    clips = None if isinstance(n_kv, int) else len(n_kv)
    shapes = [(heads,)] if clips is None else [(heads,), (heads, clips)]
    expected = " or ".join(f"[{', '.join(map(str, shape))}]" for shape in shapes)
    if isinstance(topk, bool):
        raise ValueError(f"topk must be an int or an int tensor {expected}, got {topk!r}")
    if isinstance(topk, int):
        if topk < 0:
            raise ValueError(f"topk must be >= 0, got {topk}")
        budgets = torch.full((heads,), min(topk, max([n_kv] if isinstance(n_kv, int) else n_kv)), dtype=torch.int64)
    elif isinstance(topk, torch.Tensor) and not topk.is_floating_point() and topk.dtype != torch.bool:
        if tuple(topk.shape) not in shapes:
            raise ValueError(f"topk tensor must have shape {expected} (heads={heads}), got {tuple(topk.shape)}")
        budgets = topk.detach().to("cpu", torch.int64)
    else:
        raise ValueError(f"topk must be an int or an int tensor {expected}, got {type(topk).__name__}")
    if bool((budgets < 0).any()):
        raise ValueError(f"topk must be >= 0, got {budgets.tolist()}")
    if clips is None:
        return budgets.clamp(max=n_kv)
    if budgets.dim() == 1:
        budgets = budgets[:, None].expand(heads, clips)
    return torch.minimum(budgets, torch.tensor(n_kv, dtype=torch.int64))


def select_blocks(q_lr, k_lr, topk, *, block_q, block_kv, backend="auto", kv_reduce="max", segments=None,
                  q_start=0):
    """Pick the top-k KV blocks of every query block from low-rank projections.

    Args:
        q_lr: [b, Sq, h, r] per-token low-rank queries (bshd).
        k_lr: [b, Skv, h, r] per-token low-rank keys.
        topk: int, or int tensor [h] of per-head budgets; clipped to the number of KV blocks.
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
        segments.check(k_lr.shape[1], block_q, block_kv)
        if q_start % block_q or q_start < 0 or q_start + s_q > k_lr.shape[1]:
            raise ValueError(f"q_lr holds tokens [{q_start}, {q_start + s_q}) of the packed sequence of "
                             f"{k_lr.shape[1]} tokens; they must lie in it and start on a query block (block_q={block_q})")
        n_kv = list(segments.blocks_per_clip(block_kv))
    budgets = normalize_budgets(topk, h, n_kv)
    k_max = max(int(budgets.max()), 1)

    backend = resolve_backend(backend, q_lr.device)
    if backend == "reference":
        fn = select_blocks_reference
    else:
        from .triton_selection import triton_select_blocks as fn
    return fn(q_lr, k_lr, budgets, k_max, block_q=block_q, block_kv=block_kv, kv_reduce=kv_reduce,
              segments=segments, q_start=q_start)
