"""Run one cases file in a child pytest process: compiled on a CUDA machine, else with TRITON_INTERPRET=1.

Why a child process: Triton decides at decoration time (import of the kernel module) whether a
kernel is compiled or interpreted, and other test files may import triton first in the same
process; a fresh interpreter with the variable set before any import is the robust way.
Why compiled where CUDA is: that is what the kernels run as (bfloat16 included, which the interpreter
gets wrong). Triton's interpreter before 3.7 cannot run a loop over range(0, n) with NumPy 2.4 or later
(it turns scalar arguments into one-element arrays; TypeError 'only 0-dimensional arrays can be
converted'; seen with Triton 3.6, fine with 3.7.1 and 3.9): that combination fails with what to install.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _version(module) -> tuple:
    return tuple(int(part) for part in module.__version__.split("+")[0].split(".")[:2])


def interpreter_problem():
    """Why Triton's interpreter cannot run the kernels here, or None."""
    import numpy
    import triton
    if _version(triton) < (3, 7) and _version(numpy) >= (2, 4):   # a loop over range(0, n) already fails
        return (f"Triton {triton.__version__}'s interpreter cannot run kernels with NumPy {numpy.__version__}: "
                "install numpy<2.4 or triton>=3.7 to check the kernels on CPU")
    return None


def run_cases(cases_file: str, timeout: float = 600.0) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    if not torch.cuda.is_available():
        problem = interpreter_problem()
        if problem is not None:
            raise AssertionError(problem)
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE / cases_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    if proc.returncode != 0:
        how = "compiled on CUDA" if "TRITON_INTERPRET" not in env else "under TRITON_INTERPRET=1"
        raise AssertionError(f"{cases_file} failed {how}:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}")
