"""Hybrid CP on two or more GPUs with NCCL (tests/cp_workers/nccl_suite.py under torchrun), float32 and
bfloat16, the Triton kernels against a float64 reference: forward and every gradient. Skipped below two
GPUs (the CPU suite, tests/test_cp_dist.py, covers the same entry points under gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).parent / "cp_workers" / "nccl_suite.py"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more GPUs")
def test_cp_on_gpus_with_nccl():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={torch.cuda.device_count()}", str(SUITE)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "nccl suite passed" in proc.stdout
