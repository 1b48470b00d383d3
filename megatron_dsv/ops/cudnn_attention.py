"""cuDNN frontend's block-sparse attention (CuTe DSL kernels, Hopper and Blackwell) as a backend of
:func:`megatron_dsv.ops.block_sparse_attention`.

Optional: used when ``nvidia-cudnn-frontend`` and ``nvidia-cutlass-dsl[cu13]`` are installed
(``pip install megatron_dsv[cudnn]``). Its kernels take the same per-query-block lists of KV block
ids as ours (``q2k_block_index`` [b, h, n_qblocks, k_max] int32 with per-block counts), so the mask
passes through unchanged. They cover a subset of our contract, which :func:`unsupported` names:
bfloat16 (its backward), head dim 128, square 64 or 128 blocks, lengths that are whole blocks, no
packed clips or ``kv_lens``, no lse output (its backward takes no lse gradient).
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

INSTALL_HINT = "pip install megatron_dsv[cudnn]"

# Whether two backward passes on the same inputs give the same bits (checked by
# tests/test_cudnn_backend.py on the GPU): it decides whether deterministic calls may use cuDNN.
BITWISE_REPRODUCIBLE = False


@functools.cache
def _module():
    """cuDNN frontend's block-sparse attention module, or the reason it does not import."""
    try:
        return importlib.import_module("cudnn.block_sparse_attention"), None
    except Exception as exc:  # noqa: BLE001 - ImportError, or the DSL's CUDA bindings failing to load
        return None, f"cudnn.block_sparse_attention does not import ({type(exc).__name__}: {exc}; {INSTALL_HINT})"


def unsupported(q, s_q: int, s_kv: int, d: int, block_q: int, block_kv: int, *, return_lse: bool,
                segments=None, kv_lens=None, deterministic: bool = True) -> Optional[str]:
    """Why cuDNN's kernels cannot run this call (None: they can)."""
    if q.device.type != "cuda":
        return f"needs CUDA tensors, got {q.device}"
    if torch.cuda.get_device_capability(q.device)[0] not in (9, 10, 11):
        return "needs an SM90-SM110 GPU (its backward)"
    if q.dtype != torch.bfloat16:
        return f"needs bfloat16 (its backward), got {q.dtype}"
    if d != 128:
        return f"needs head dim 128 (its backward), got {d}"
    if block_q != block_kv or block_q not in (64, 128):
        return f"needs square 64 or 128 blocks, got block_q={block_q}, block_kv={block_kv}"
    if s_q % block_q or s_kv % block_kv:
        return f"needs lengths that are whole blocks, got Sq={s_q}, Skv={s_kv} with blocks of {block_q}"
    if segments is not None or kv_lens is not None:
        return "takes no packed clips (segments) or kv_lens"
    if return_lse:
        return "takes no lse gradient in its backward (return_lse=True)"
    if deterministic and not BITWISE_REPRODUCIBLE:
        return ("its backward is not bitwise reproducible; pass deterministic=False "
                "(DSVConfig.deterministic_backward=False) to allow it")
    module, reason = _module()
    return reason if module is None else None


def _bshd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """bshd view of a bshd or sbhd tensor (cuDNN reads strides; its head dim must be unit-stride)."""
    x = x if layout == "bshd" else x.transpose(0, 1)
    return x if x.stride(-1) == 1 else x.contiguous()


# Custom ops, as for the Triton kernels: opaque to torch.compile, with fake implementations.
@torch.library.custom_op("megatron_dsv::cudnn_block_sparse_fwd", mutates_args=())
def cudnn_block_sparse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor,
                           kv_cnt: torch.Tensor, block: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, Sq, h, d], natural-log lse [b, h, Sq] float32); q, k, v bshd, kv_idx/kv_cnt int32."""
    module = _module()[0]
    res = module.block_sparse_attention_forward(
        q, k, v, kv_idx, q2k_block_nums=kv_cnt, sparse_block_size=block, allow_empty_block_nums=True,
        softmax_scale=scale, layout="bshd")
    return res["o_tensor"], res["lse_tensor"]


@cudnn_block_sparse_fwd.register_fake
def _(q, k, v, kv_idx, kv_cnt, block, scale):
    b, s_q, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, s_q), dtype=torch.float32)


@torch.library.custom_op("megatron_dsv::cudnn_block_sparse_bwd", mutates_args=())
def cudnn_block_sparse_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor, block: int,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    module = _module()[0]
    res = module.block_sparse_attention_backward(
        do.contiguous(), q, k, v, out, lse, kv_idx, q2k_block_nums=kv_cnt, sparse_block_size=block,
        softmax_scale=scale, layout="bshd")
    return res["dq_tensor"], res["dk_tensor"], res["dv_tensor"]


@cudnn_block_sparse_bwd.register_fake
def _(do, q, k, v, out, lse, kv_idx, kv_cnt, block, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_idx, kv_cnt, block, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], kv_idx, kv_cnt)
    ctx.args = (block, scale)


def _backward_rule(ctx, dout, _dlse):
    q, k, v, out, lse, kv_idx, kv_cnt = ctx.saved_tensors
    dq, dk, dv = cudnn_block_sparse_bwd(dout, q, k, v, out, lse, kv_idx, kv_cnt, *ctx.args)
    return dq, dk, dv, None, None, None, None


cudnn_block_sparse_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def cudnn_block_sparse_attention(q, k, v, kv_idx, kv_cnt, *, block_q, block_kv, scale, layout, return_lse=False,
                                 segments=None, kv_lens=None, deterministic=True):
    """cuDNN backend of :func:`megatron_dsv.ops.block_sparse_attention` (inputs already validated and
    :func:`unsupported` already None). Entries of kv_idx past each count are never read; counts are
    clipped to kv_idx's width on the device, as the Triton kernels clip them."""
    del return_lse, segments, kv_lens, deterministic  # cases `unsupported` excludes
    out, _ = cudnn_block_sparse_fwd(_bshd(q, layout), _bshd(k, layout), _bshd(v, layout),
                                    kv_idx.to(torch.int32).contiguous(),
                                    kv_cnt.to(torch.int32).clamp(0, kv_idx.shape[-1]).contiguous(),
                                    block_q, float(scale))
    # sbhd callers get sbhd-contiguous output, as from the Triton kernels (a copy of o only).
    return out if layout == "bshd" else out.transpose(0, 1).contiguous()
