"""The DSV layers' upkeep in the backward (the predictor's training, profiles) on a CUDA stream of its own.

In a stage-1 step every DSV layer's backward trains its predictor: the keys' Gram matrix, the loss and
its gradients, the reduction over replicas, some 40 small kernels per layer, each bound by launch
latency. On the step's stream they lengthen the step by their latency: `small` at 16k tokens x batch 1,
both replayed from step graphs on H200, stage 1 ran 0.64 ms more kernel time and 0.35 ms more gaps
between kernels than dense's 53.7 ms step (bench/results/step_h200/s15/). On a stream of their own (high
priority, so their few blocks are scheduled as soon as an SM frees) they run while the backward goes on;
in a captured step they become a branch of the graph.

Protocol, per device (all layers share one upkeep stream):
- `aside(device, inputs)` around a layer's upkeep: the current stream waits for the upkeep forked before
  in this backward (one layer earlier: it had that layer's backward to run), the upkeep stream waits for
  the work queued on the current stream (the upkeep reads what the backward produced), and the upkeep
  is queued on the upkeep stream. Its inputs are held until that next wait: freed earlier, the current
  stream's allocator could give their memory to later kernels while the upkeep still reads it. Holding
  one layer's inputs at a time keeps the extra memory to one layer's q and k.
- `join(device)` at the end of the backward (a final callback, which runs on the stream backward() was
  called on): the current stream waits for all of it, and the inputs are released.
The upkeep's outputs are allocated on the upkeep stream and read on the current stream only after a wait;
their memory goes back to the upkeep stream's pool when freed, and the upkeep stream reuses it only after
its next wait for the current stream, which orders it after every read queued before. Off CUDA, or with
ENABLED False, `aside` runs the work where it is.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Sequence

import torch

# The upkeep runs on its own stream (False: on the current stream, as before; bench/eager_ab.py compares).
ENABLED = True

_streams: Dict[torch.device, tuple] = {}   # device -> (upkeep stream, fork event, join event)
_held: Dict[torch.device, tuple] = {}


def _stream(device: torch.device) -> tuple:
    # The events are recorded anew at every fork and join (a wait takes the record made before it): creating
    # them per call, as Stream.wait_stream does, cost ~4 us of host time per wait against ~2
    # (bench/results/step_h200/s16/host_calls_probe.txt; 3-5x that inside a step).
    if device not in _streams:
        lo, hi = torch.cuda.Stream.priority_range()
        _streams[device] = (torch.cuda.Stream(device=device, priority=min(lo, hi)), torch.Event(device),
                            torch.Event(device))
    return _streams[device]


@contextmanager
def aside(device: torch.device, inputs: Sequence) -> Iterator[None]:
    """Run the enclosed upkeep, which reads `inputs` (tensors, or objects holding them), on the upkeep
    stream of `device` (see the module)."""
    if device.type != "cuda" or not ENABLED:
        yield
        return
    side, fork, _ = _stream(device)
    # (torch.accelerator's stream lookup costs ~3 us of host time, torch.cuda.current_stream()'s ~7)
    current = torch.accelerator.current_stream(device)
    if device in _held:   # an upkeep forked before in this backward: it is done before its inputs may go
        # (Only then: the first fork of a captured backward must not wait on work outside the capture.)
        join(device, current)
    fork.record(current)
    side.wait_event(fork)
    _held[device] = tuple(inputs)
    if device.index != torch.cuda.current_device():   # set_stream would switch the current device too
        with torch.cuda.stream(side):
            yield
        return
    torch.cuda.set_stream(side)   # (~1 us of host time; the stream context ~10)
    try:
        yield
    finally:
        torch.cuda.set_stream(current)


def join_all() -> None:
    """join() every device with upkeep forked (before a capture: a backward that raised may have left one)."""
    for device in list(_held):
        join(device)


def join(device: torch.device, current=None) -> None:
    """The current stream (`current`: it, where the caller has it) waits for every upkeep forked on
    `device`; their inputs are released."""
    if device in _held:
        side, _, join_ = _streams[device]
        join_.record(side)
        (torch.accelerator.current_stream(device) if current is None else current).wait_event(join_)
        del _held[device]
