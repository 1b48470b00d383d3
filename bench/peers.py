"""Peer block-sparse attention kernels on our exact mask, for bench/kernels.py --peers.

- cuDNN frontend's block-sparse attention (``nvidia-cudnn-frontend``, CuTe DSL): through our
  ``backend="cudnn"`` wrapper (ops/cudnn_attention.py: no copies for bshd inputs).
- VSA (FastVideo's ``fastvideo-kernel``): ``block_sparse_attn_from_indices`` on [b, h, s, d]
  contiguous copies made outside the timing (its kernels take that layout only). It runs its
  ThunderKittens SM90 kernels where its compiled extension loads, else its Triton kernels; the
  record says which, and why.

Each function returns a dict of fields for the sparse point's record (times, error against our
output, or the reason the peer did not run).
"""

from __future__ import annotations

import traceback


def _err(rec, prefix, exc):
    rec[f"{prefix}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    rec[f"{prefix}_traceback"] = traceback.format_exc()[-600:]
    return rec


def cudnn_bsa(q, k, v, do, kv_idx, kv_cnt, block, ours_out, time_fwd_bwd, rel_err):
    from megatron_dsv.ops import block_sparse_attention, cudnn_attention

    rec = {}
    reason = cudnn_attention.unsupported(q, q.shape[1], k.shape[1], q.shape[-1], block, block, return_lse=False,
                                         deterministic=False)
    if reason is not None:
        rec["cudnn_bsa_error"] = reason
        return rec

    def fwd(q_, k_, v_):
        return block_sparse_attention(q_, k_, v_, kv_idx, kv_cnt, block_q=block, block_kv=block, backend="cudnn",
                                      deterministic=False)
    try:
        rec["cudnn_bsa_err_vs_ours"] = rel_err(fwd(q, k, v), ours_out)
        rec["cudnn_bsa_fwd_ms"], rec["cudnn_bsa_fwdbwd_ms"], rec["cudnn_bsa_peak_bytes"] = time_fwd_bwd(fwd, q, k, v, do)
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON
        _err(rec, "cudnn_bsa", exc)
    return rec


def _vsa_path():
    """('sm90-thunderkittens' or 'triton', why) for the path fastvideo_kernel will take."""
    import importlib

    import torch

    fbsa = importlib.import_module("fastvideo_kernel.block_sparse_attn")  # the package re-exports a function of that name

    try:
        from fastvideo_kernel._C import fastvideo_kernel_ops  # noqa: F401
        loaded, why = True, "compiled extension loaded"
    except Exception as exc:  # noqa: BLE001
        loaded, why = False, f"compiled extension did not load ({type(exc).__name__}: {str(exc)[:200]})"
    fwd, bwd = fbsa._get_sm90_ops()
    if loaded and fwd is not None and bwd is not None and torch.cuda.get_device_capability() == (9, 0):
        return "sm90-thunderkittens", why
    return "triton", why


def vsa(q, k, v, do, kv_idx, kv_cnt, block, ours_out, time_fwd_bwd, rel_err):
    import torch

    rec = {}
    if block != 64:
        rec["vsa_error"] = f"VSA's kernels take 64-token blocks only, got {block}"
        return rec
    try:
        from fastvideo_kernel import block_sparse_attn_from_indices
        rec["vsa_path"], rec["vsa_path_why"] = _vsa_path()
    except Exception as exc:  # noqa: BLE001
        return _err(rec, "vsa", exc)
    n_kv = k.shape[1] // block
    sizes = torch.full((n_kv,), block, dtype=torch.int32, device=q.device)
    idx = kv_idx.clamp_min(0).to(torch.int32).contiguous()  # its kernels read only the first q2k_num entries
    cnt = kv_cnt.to(torch.int32).contiguous()
    qh, kh, vh, doh = (t.transpose(1, 2).contiguous() for t in (q, k, v, do))  # [b, h, s, d], untimed

    def fwd(q_, k_, v_):
        return block_sparse_attn_from_indices(q_, k_, v_, idx, cnt, sizes)[0]
    try:
        rec["vsa_err_vs_ours"] = rel_err(fwd(qh, kh, vh).transpose(1, 2), ours_out)
        rec["vsa_fwd_ms"], rec["vsa_fwdbwd_ms"], rec["vsa_peak_bytes"] = time_fwd_bwd(fwd, qh, kh, vh, doh)
    except Exception as exc:  # noqa: BLE001
        _err(rec, "vsa", exc)
    return rec
