"""torch.profiler tables of a region of a benchmark (bench/step.py, bench/e2e.py --trace)."""

from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path

import torch


@contextlib.contextmanager
def trace_to(folder, name: str, device: torch.device):
    """Top host and device ops of the enclosed code as tables under folder/name_{host,device}_ops.txt
    (device: CUDA only), its timeline as folder/name.json.gz (chrome://tracing, Perfetto: where the
    GPU waits for the host) and, on CUDA, the GPU's busy and idle time in folder/name_gpu_time.txt
    (gpu_time); folder None: no trace."""
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
        with gzip.open(out / f"{name}.json.gz", "rt") as f:
            gpu = gpu_time(json.load(f)["traceEvents"])
        (out / f"{name}_gpu_time.txt").write_text(
            "".join(f"{key}: {value:.3f}\n" if isinstance(value, float) else f"{key}: {value}\n"
                    for key, value in gpu.items()))


def gpu_time(events: list) -> dict:
    """Where the GPU's time went in a trace (chrome-trace events): its span from the first kernel (or copy,
    or memset) to the end of the last, the time some kernel ran (intervals merged over streams), and the
    idle rest, in ms; the count of kernels and of gaps between them. Two arms that run the same kernels
    differ in their gaps where one of them launches many short ones (each gap a launch's latency)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not spans:
        return {"kernels": 0}
    busy, gaps, (start, end) = 0.0, 0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy, gaps, start = busy + end - start, gaps + 1, s
        end = max(end, e)
    busy += end - start
    first, last = spans[0][0], max(e for _, e in spans)
    return {"kernels": len(spans), "span_ms": (last - first) / 1e3, "busy_ms": busy / 1e3,
            "idle_ms": (last - first - busy) / 1e3, "gaps": gaps}
