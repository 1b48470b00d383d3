"""Which kernels run a block_sparse_attention call.

backend='auto' runs the reference off the GPU. On the GPU, it runs the Triton kernels (atomic-free,
reproducible); a call that allows non-reproducible kernels (deterministic=False, the default) may
also run cuDNN frontend's block-sparse kernels where installed and able to run the call: then each
is timed once per shape (forward + backward on the call's own inputs, compiles excluded, calls issued
back to back, in interleaved rounds), the fastest is kept and a one-line
notice gives the times. Inside a CUDA-graph capture or a torch.compile trace nothing is timed: a
shape seen before keeps its choice, a new one runs the first (Triton's atomic-free schedule).
"""

from __future__ import annotations

import os
import statistics
from typing import Callable, Dict, Sequence

import torch

from ..config import BACKENDS
from ..notice import notice
from ..timing import throughput_ms

_CHOSEN: Dict[tuple, str] = {}


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


# Warm-up calls per candidate (they compile and autotune), then rounds of timed calls in alternating order
# (A B, B A, ...), CALLS_PER_ROUND back to back each. A kernel's time is the median of its rounds, so one
# slow round (a clock dip, another process on the GPU) does not decide the choice.
WARMUP, ROUNDS, CALLS_PER_ROUND = 4, 4, 3


def _choose(key: tuple, runners: Dict[str, Callable[[], None]], device: torch.device) -> str:
    def failed(name, exc):
        notice(f"block_sparse_attention kernel {name!r} failed at {key} ({type(exc).__name__}: {exc}); "
               "not chosen")

    # Measured on an H200 (bench/NOTES_kernels.md):
    # - cuDNN's first calls after one warm-up still ran slow (27.4-32.8 ms at 64k against 27.7-27.9 in a long
    #   benchmark): four warm-ups.
    # - Synchronised one by one, a call's host time adds to its device time instead of overlapping it; that
    #   form kept Triton at 5% density, where ours took 1.09x cuDNN's time in a loop. So each round's calls
    #   run back to back, as a training loop issues them (each round starts synchronised: its first call's
    #   host time still counts, a third of a call per round).
    # - One block of five calls per kernel once picked the slower one (64k, 10%: cuDNN timed 31.8 ms in the
    #   choice, 26.8 ms in a long benchmark of the same process). Rounds and their median keep one such
    #   stretch from deciding; in one later run 24 choices of each form did not show which picks better.
    live = {}
    for name, run in runners.items():
        try:
            for _ in range(WARMUP):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)   # a kernel's asynchronous errors surface here
            live[name] = run
        except Exception as exc:  # noqa: BLE001 - a kernel failing here is reported and not chosen
            failed(name, exc)
    rounds: Dict[str, list] = {name: [] for name in live}
    for r in range(ROUNDS):
        names = list(rounds)   # (a kernel that failed in an earlier round is no longer there)
        for name in (names if r % 2 == 0 else names[::-1]):
            try:
                rounds[name].append(throughput_ms(live[name], device, warmup=0, iters=CALLS_PER_ROUND))
            except Exception as exc:  # noqa: BLE001
                failed(name, exc)
                del rounds[name]
    times = {name: statistics.median(ts) for name, ts in rounds.items()}
    best = min(times, key=times.get) if times else next(iter(runners))
    notice(f"block_sparse_attention at {key}, forward + backward (median of {ROUNDS} rounds): "
           + ", ".join(f"{n} {t:.2f} ms" for n, t in times.items()) + f" -> {best}")
    return best


def resolve_backend(backend: str, device: torch.device) -> str:
    """'triton' or 'reference': our own kernels for this device (selection always; attention unless
    backend='auto' picks another GPU kernel, or backend='cudnn')."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if backend in ("triton", "triton-one-recompute") and not triton_usable(device):
        raise ValueError(f"backend={backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); got {device}")
    if backend in ("auto", "cudnn"):
        return "triton" if device.type == "cuda" else "reference"
    return "reference" if backend == "reference" else "triton"


def choose_kernel(key: tuple, names: Sequence[str], runners: Callable[[], Dict[str, Callable[[], None]]],
                  device: torch.device) -> str:
    """One of `names` (the GPU kernels allowed for a call, in order of preference) for backend='auto':
    the only one, or the fastest measured at this shape (key) once. runners() gives a forward +
    backward closure per name for timing (called only when a choice must be measured)."""
    if len(names) == 1:
        return names[0]
    key = (*key, tuple(names))
    if key not in _CHOSEN:
        if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return names[0]
        _CHOSEN[key] = _choose(key, runners(), device)
    return _CHOSEN[key]
