"""Timing on the device: forward-time accounting (selection vs attention) without synchronising the
device, the median time of a callable (dispatch by cost, CP calibration), and the time per call of
calls issued back to back (the choice of kernels).

On CUDA, regions are bracketed by events that are only read when the totals are asked
for; on CPU a wall clock is used. Under torch.compile or CUDA-graph capture the regions are not
timed: time the compiled call or the replay from outside it.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

MAX_PENDING = 256  # resolve old CUDA events past this many, so the list stays bounded


class ForwardTimer:
    def __init__(self):
        self._pending = []  # (name, start event, end event, device)
        self._total_ms = defaultdict(float)
        # Events read and free for reuse, per device: making and recording a new one cost ~9 us of host time
        # against ~2 for recording one (bench/results/step_h200/s16/host_calls_probe.txt; 3-5x that inside
        # a step), and an eager step of `small` times 8 regions.
        self._free = defaultdict(list)

    @contextmanager
    def __call__(self, name: str, device: torch.device):
        if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            yield   # a traced or captured region is not timed (a graph holds no clocks or host events)
        elif device.type == "cuda":
            free = self._free[device]
            start, end = free.pop() if free else _timing_events(device)
            # (torch.accelerator's stream lookup costs ~3 us of host time, torch.cuda.current_stream()'s ~7)
            stream = torch.accelerator.current_stream(device)
            start.record(stream)
            yield
            end.record(stream)
            self._pending.append((name, start, end, device))
            if len(self._pending) > MAX_PENDING:
                self._resolve(self._pending[: MAX_PENDING // 2])
                del self._pending[: MAX_PENDING // 2]
        else:
            t0 = time.perf_counter()
            yield
            self._total_ms[name] += (time.perf_counter() - t0) * 1e3

    def _resolve(self, events):
        for name, start, end, device in events:
            end.synchronize()
            self._total_ms[name] += start.elapsed_time(end)
            self._free[device].append((start, end))

    def read(self) -> dict:
        """Milliseconds per region since the last read (syncs on pending CUDA events)."""
        self._resolve(self._pending)
        self._pending.clear()
        totals = dict(self._total_ms)
        self._total_ms.clear()
        return totals


def _timing_events(device: torch.device) -> tuple:
    return torch.Event(device, enable_timing=True), torch.Event(device, enable_timing=True)


@contextmanager
def timing_autograd() -> Iterator[None]:
    """Where a forward + backward is timed on copies of a call's inputs: grad on (the first call of a
    shape may come in a no-grad recomputation pass), and plain saved tensors (under non-reentrant
    activation checkpointing the caller's hooks would otherwise take the timed graphs' tensors)."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        yield


def time_ms(fn: Callable[[], None], device: torch.device, *, warmup: int = 2, iters: int = 5) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def throughput_ms(fn: Callable[[], None], device: torch.device, *, warmup: int = 3, iters: int = 5) -> float:
    """Milliseconds per call of `iters` calls of fn() issued back to back (CUDA events around all of
    them on a GPU, wall clock elsewhere): as in a training loop, the host queues the next call while
    the device runs the last, so a call costs its device time, or its host time where that is longer.
    time_ms's synchronised single calls cost the sum of both."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters
