"""Run one cases file in a child pytest process: compiled on a CUDA machine, else with TRITON_INTERPRET=1.

Why a child process: Triton decides at decoration time (import of the kernel module) whether a
kernel is compiled or interpreted, and other test files may import triton first in the same
process; a fresh interpreter with the variable set before any import is the robust way.
Why compiled where CUDA is: that is what the kernels run as (bfloat16 included, which the interpreter
gets wrong), and Triton 3.6's interpreter cannot run our kernels' loops with NumPy 2 (it turns scalar
bounds into one-element arrays; TypeError 'only 0-dimensional arrays can be converted').
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run_cases(cases_file: str, timeout: float = 600.0) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE / cases_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    if proc.returncode != 0:
        how = "compiled on CUDA" if "TRITON_INTERPRET" not in env else "under TRITON_INTERPRET=1"
        raise AssertionError(f"{cases_file} failed {how}:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}")
