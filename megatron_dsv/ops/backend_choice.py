"""Which kernels run a block_sparse_attention call.

backend='auto' runs the Triton kernels on CUDA tensors and the reference elsewhere. Where cuDNN
frontend's block-sparse kernels are installed and can run the call, it times both GPU backends once
per shape (forward + backward on the call's own inputs, cuDNN's compile excluded), keeps the faster
and logs the times. Inside a CUDA-graph capture or a torch.compile trace nothing is timed: a shape
seen before keeps its choice, a new one runs Triton.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Optional

import torch

from ..config import BACKENDS

log = logging.getLogger("megatron_dsv")

_CHOSEN: Dict[tuple, str] = {}


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _ms(fn: Callable[[], None], reps: int = 3) -> float:
    fn()  # warm-up: compiles and autotunes on first use
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _choose(key: tuple, runners: Dict[str, Callable[[], None]]) -> str:
    times = {}
    for name, run in runners.items():
        try:
            times[name] = _ms(run)
        except Exception as exc:  # noqa: BLE001 - a backend failing here is reported and not chosen
            log.warning("megatron_dsv: block_sparse_attention backend %r failed at %s (%s: %s); not chosen",
                        name, key, type(exc).__name__, exc)
    best = min(times, key=times.get) if times else "triton"
    log.info("megatron_dsv: block_sparse_attention at %s, forward + backward: %s -> %s", key,
             ", ".join(f"{n} {t:.2f} ms" for n, t in times.items()), best)
    return best


def resolve_backend(backend: str, device: torch.device) -> str:
    """'triton' or 'reference' for our own kernels (selection, and attention unless cuDNN's runs it)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if backend == "triton" and not triton_usable(device):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); got {device}")
    if backend in ("auto", "cudnn"):
        return "triton" if device.type == "cuda" else "reference"
    return backend


def attention_backend(backend: str, q: torch.Tensor, s_kv: int, d: int, block_q: int, block_kv: int, k_max: int,
                      layout: str, *, cudnn_reason: Callable[[], Optional[str]],
                      runners: Callable[[], Dict[str, Callable[[], None]]]) -> str:
    """The backend that runs a block_sparse_attention call: 'reference', 'triton' or 'cudnn'.

    cudnn_reason() says why cuDNN cannot run it (None: it can); runners() gives a forward + backward
    closure per GPU backend for timing (called only when a choice must be measured).
    """
    if backend == "cudnn":
        reason = cudnn_reason()
        if reason is not None:
            raise ValueError(f"backend='cudnn' cannot run this call: cuDNN's block-sparse attention {reason}")
        return backend
    ours = resolve_backend(backend, q.device)
    if backend != "auto" or ours != "triton" or cudnn_reason() is not None:
        return ours
    # Work grows with k_max: one choice per power-of-two bucket of it.
    key = (str(q.device), q.dtype, layout, tuple(q.shape), s_kv, d, block_q, block_kv,
           1 << max(k_max - 1, 0).bit_length())
    if key not in _CHOSEN:
        if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return "triton"
        _CHOSEN[key] = _choose(key, runners())
    return _CHOSEN[key]
