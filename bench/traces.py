"""torch.profiler tables of a region of a benchmark (bench/step.py, bench/e2e.py --trace)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


@contextlib.contextmanager
def trace_to(folder, name: str, device: torch.device):
    """Top host and device ops of the enclosed code as tables under folder/name_{host,device}_ops.txt
    (device: CUDA only), and its timeline as folder/name.json.gz (chrome://tracing, Perfetto: where the
    GPU waits for the host); folder None: no trace."""
    if folder is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        yield
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    avg = prof.key_averages()
    (out / f"{name}_host_ops.txt").write_text(avg.table(sort_by="self_cpu_time_total", row_limit=40))
    prof.export_chrome_trace(str(out / f"{name}.json.gz"))   # gzipped by the suffix
    if device.type == "cuda":
        (out / f"{name}_device_ops.txt").write_text(avg.table(sort_by="self_cuda_time_total", row_limit=40))
