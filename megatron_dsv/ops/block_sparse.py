"""block_sparse_attention: the public entry point, input checks and backend dispatch."""

from __future__ import annotations

import functools

import torch

from ..config import BLOCK_SIZES
from ..timing import timing_autograd
from . import cudnn_attention
from .backend_choice import choose_kernel, resolve_backend
from .checks import check_flags, check_qkv, check_scale
from .reference import block_sparse_attention_reference
from .segments import check_segments


def check_block_sizes(block_q, block_kv):
    # `in` alone would let 64.0 or True through (they compare equal to ints).
    if any(type(x) is not int or x not in BLOCK_SIZES for x in (block_q, block_kv)):
        raise ValueError(f"block_q and block_kv must be ints in {BLOCK_SIZES}, got {block_q!r}, {block_kv!r}")


def check_block_mask(kv_idx, kv_cnt, b, h, n_q, name_prefix=""):
    """Shape/dtype checks of the (kv_idx, kv_cnt) pair; no device sync."""
    if kv_idx.dtype not in (torch.int32, torch.int64) or kv_cnt.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_idx and kv_cnt must be int32 or int64, got {kv_idx.dtype} and {kv_cnt.dtype}")
    if kv_idx.dim() != 4 or tuple(kv_idx.shape[:3]) != (b, h, n_q):
        raise ValueError(
            f"kv_idx must be [batch={b}, heads={h}, n_qblocks={n_q}, k_max], got {tuple(kv_idx.shape)}"
        )
    if tuple(kv_cnt.shape) != (b, h, n_q):
        raise ValueError(f"kv_cnt must be [batch={b}, heads={h}, n_qblocks={n_q}], got {tuple(kv_cnt.shape)}")


def check_block_mask_values(kv_idx, kv_cnt, n_kv, segments=None, block_q=None, block_kv=None):
    """Value checks (ids in range, no duplicates within the count; with segments, ids within the
    query block's clip); syncs with the device."""
    k_max = kv_idx.shape[-1]
    if bool(((kv_cnt < 0) | (kv_cnt > min(k_max, n_kv))).any()):
        raise ValueError(f"kv_cnt values must lie in [0, min(k_max={k_max}, n_kv_blocks={n_kv})]")
    valid = torch.arange(k_max, device=kv_idx.device) < kv_cnt.unsqueeze(-1)
    ids = kv_idx.long()
    lo, hi = 0, n_kv
    if segments is not None:  # [first, last) KV block of each query block's clip
        tokens = segments.kv_token_range(block_q, kv_idx.device).long()
        lo = (tokens[:, 0] // block_kv).view(1, 1, -1, 1)
        hi = (-(-tokens[:, 1] // block_kv)).view(1, 1, -1, 1)
    if bool((valid & ((ids < lo) | (ids >= hi))).any()):
        where = "outside its query block's clip" if segments is not None else f"outside [0, {n_kv})"
        raise ValueError(f"kv_idx holds a block id {where} within kv_cnt")
    marked = torch.where(valid, ids, -1 - torch.arange(k_max, device=ids.device)).sort(-1).values
    if bool((marked[..., 1:] == marked[..., :-1]).any()):
        raise ValueError("kv_idx lists a KV block twice for one query block")


def check_kv_lens(kv_lens, b, h, n_kv, block_kv, device) -> torch.Tensor:
    """kv_lens [n_kv] or [b, h, n_kv] on `device` -> int32 [1 or b*h, n_kv] (no device sync)."""
    if not torch.is_tensor(kv_lens) or kv_lens.is_floating_point() or kv_lens.dtype == torch.bool:
        raise ValueError(f"kv_lens must be an int tensor, got {kv_lens!r:.60}")
    if kv_lens.device != device:
        raise ValueError(f"kv_lens must be on q's device {device}, got {kv_lens.device}")
    if tuple(kv_lens.shape) not in ((n_kv,), (b, h, n_kv)):
        raise ValueError(f"kv_lens must be [n_kv_blocks={n_kv}] or [batch={b}, heads={h}, n_kv_blocks={n_kv}], "
                         f"got {tuple(kv_lens.shape)}")
    return kv_lens.reshape(-1, n_kv).to(torch.int32).clamp(0, block_kv)


def _gpu_kernels(cudnn_reason) -> dict:
    """The GPU kernels backend='auto' may run, in order of preference: name -> function(q, k, v, kv_idx,
    kv_cnt, **call). Triton's atomic-free kernels, and cuDNN's where installed, able to run the call and
    allowed (cudnn_reason() None: a deterministic call is refused there): alone, Triton's run untimed.
    Triton's one-recompute schedule is not a candidate: it was slower than the atomic-free one at every
    shape measured (bench/NOTES_kernels.md)."""
    from .triton_attention import triton_block_sparse_attention

    kernels = {"triton": triton_block_sparse_attention}
    # Traced code (torch.compile) runs our kernels only.
    if not torch.compiler.is_compiling() and cudnn_reason() is None:
        kernels["cudnn"] = cudnn_attention.cudnn_block_sparse_attention
    return kernels


def _timing_runs(kernels: dict, q, k, v, kv_idx, kv_cnt, call: dict) -> dict:
    """A forward + backward closure per kernel, on copies of q, k, v (for backend='auto' to time)."""
    grad = torch.randn_like(q)
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def fwd_bwd(fn):
        with timing_autograd():
            fn(*inputs, kv_idx, kv_cnt, **call).backward(grad)

    return {name: functools.partial(fwd_bwd, fn) for name, fn in kernels.items()}


def block_sparse_attention(q, k, v, kv_idx, kv_cnt, *, block_q, block_kv, scale=None, layout="bshd",
                           backend="auto", return_lse=False, segments=None, kv_lens=None, deterministic=False):
    """Exact softmax attention of each query block over its selected KV blocks.

    Args:
        q: [b, Sq, h, d] ("bshd") or [Sq, b, h, d] ("sbhd"); read through strides.
        k, v: same layout; may hold a different number of tokens Skv than q.
        kv_idx: [b, h, ceil(Sq/block_q), k_max] int32/int64: KV block ids (of k/v) of each query
            block; entries past the count are ignored.
        kv_cnt: [b, h, ceil(Sq/block_q)]: how many entries of kv_idx are used. 0 -> zero output.
            The values of kv_idx and kv_cnt are checked (ValueError) by the reference backend only:
            on the GPU a check would need a host sync per call. There counts are clipped to
            [0, k_max]; the Triton kernels read nothing out of bounds for ids outside [0, n_kv_blocks)
            (cuDNN's get them as they are), but such ids, or an id listed twice, give wrong results.
            A hand-made mask can be checked once with
            ``megatron_dsv.ops.block_sparse.check_block_mask_values``; ``select_blocks`` makes
            valid ones.
        scale: softmax scale (default 1/sqrt(d)).
        backend: "triton" (our kernels, atomic-free: bitwise reproducible), "reference", "cudnn"
            (cuDNN frontend's block-sparse kernels, where installed and able to run the call, see
            ops/cudnn_attention.py), "triton-one-recompute" (ours with a backward that computes P
            once and adds dq with float32 atomics; slower than "triton" wherever measured) or "auto"
            (reference off the GPU; on it Triton's, or the faster of Triton's and cuDNN's where
            cuDNN's are installed, able to run the call and allowed, timed once per shape:
            ops/backend_choice.py).
        return_lse: also return the log-sum-exp [b, h, Sq] float32 (-inf for rows with no keys).
        segments: packed clips (:class:`megatron_dsv.ops.Segments`), self-attention only: every
            query block may only list KV blocks of its own clip (not re-checked by the Triton
            backend: that needs a host sync) and query blocks of pure padding list none; padding
            keys are masked, padding rows get output 0 (lse -inf) and zero gradients.
        kv_lens: int [n_kv_blocks] or [b, h, n_kv_blocks]: only the first kv_lens[g] keys of KV block
            g exist; the rest are masked (no attention weight, zero dk/dv). For KV buffers that
            hold padded blocks in an order of their own (the CP exchange); packed sequences in their
            own layout pass ``segments`` instead, which implies the lengths.
        deterministic: True: bitwise reproducible kernels only; "cudnn" and "triton-one-recompute"
            then raise, "auto" keeps to Triton's. False (default, as in FlashAttention): "auto" may
            pick cuDNN's. True while torch.use_deterministic_algorithms is on. "triton" and the
            reference are reproducible either way; cuDNN's backward is not
            (cudnn_attention.BITWISE_REPRODUCIBLE).

    Returns out in q's layout and dtype (and lse), differentiable in q, k, v.
    """
    (b, s_q, h, d), s_kv = check_qkv(q, k, v, layout)
    if not (q.device == kv_idx.device == kv_cnt.device):
        raise ValueError("q, k, v, kv_idx and kv_cnt must be on one device")
    check_block_sizes(block_q, block_kv)
    n_q = -(-s_q // block_q)
    check_block_mask(kv_idx, kv_cnt, b, h, n_q)
    if segments is not None:
        if s_kv != s_q:
            raise ValueError(f"segments (packed clips) need self-attention lengths; got Sq={s_q}, Skv={s_kv}")
        check_segments(segments, s_q, block_q, block_kv)
    if kv_lens is not None:
        if segments is not None:
            raise ValueError("pass segments or kv_lens, not both: segments imply the KV block lengths")
        kv_lens = check_kv_lens(kv_lens, b, h, -(-s_kv // block_kv), block_kv, q.device)
    check_scale(scale)
    scale = d ** -0.5 if scale is None else float(scale)
    check_flags(return_lse=return_lse, deterministic=deterministic)

    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    if backend == "triton-one-recompute" and deterministic:
        raise ValueError("backend='triton-one-recompute' is not bitwise reproducible (dq by float32 atomics); "
                         "pass deterministic=False, with torch.use_deterministic_algorithms off")
    call = dict(block_q=block_q, block_kv=block_kv, scale=scale, layout=layout, return_lse=return_lse,
                segments=segments, kv_lens=kv_lens)

    cudnn_reason = functools.partial(cudnn_attention.unsupported, q, s_q, s_kv, d, block_q, block_kv,
                                     return_lse=return_lse, segments=segments, kv_lens=kv_lens,
                                     deterministic=deterministic)
    if backend == "cudnn":
        reason = cudnn_reason()
        if reason is not None:
            raise ValueError(f"backend='cudnn' cannot run this call: cuDNN's block-sparse attention {reason}")
        fn = cudnn_attention.cudnn_block_sparse_attention
    elif resolve_backend(backend, q.device) == "reference":
        if not torch.compiler.is_compiling():   # host checks of device values: kept out of compiled graphs
            check_block_mask_values(kv_idx, kv_cnt, -(-s_kv // block_kv), segments, block_q, block_kv)
        fn = block_sparse_attention_reference
    elif backend in ("triton", "triton-one-recompute"):
        from .triton_attention import triton_block_sparse_attention

        fn = functools.partial(triton_block_sparse_attention, one_recompute=backend == "triton-one-recompute")
    else:  # "auto" on the GPU
        kernels = _gpu_kernels(cudnn_reason)
        key = (str(q.device), q.dtype, layout, tuple(q.shape), s_kv, block_q, block_kv,
               1 << max(kv_idx.shape[-1] - 1, 0).bit_length())  # work grows with k_max: power-of-two buckets
        runs = lambda: _timing_runs(kernels, q, k, v, kv_idx, kv_cnt, call)  # noqa: E731
        fn = kernels[choose_kernel(key, list(kernels), runs, q.device)]
    return fn(q, k, v, kv_idx, kv_cnt, **call)
