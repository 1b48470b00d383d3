"""Run one cases file in a child pytest process with TRITON_INTERPRET=1.

Why a child process: Triton decides at decoration time (import of the kernel module) whether a
kernel is compiled or interpreted, and other test files may import triton first in the same
process; a fresh interpreter with the variable set before any import is the robust way.
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_interpreted(cases_file: str, timeout: float = 240.0) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(HERE), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE / cases_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    if proc.returncode != 0:
        raise AssertionError(f"{cases_file} failed under TRITON_INTERPRET=1:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}")
