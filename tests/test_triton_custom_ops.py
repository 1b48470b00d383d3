"""Triton kernels as torch custom ops (opcheck, torch.compile) under TRITON_INTERPRET=1 on CPU.

The cases live in tests/triton_cases/custom_op_cases.py and run in a child pytest process
(tests/triton_cases/runner.py says why).
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "triton_cases_runner", Path(__file__).resolve().parent / "triton_cases" / "runner.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)


def test_triton_custom_ops_interpreted():
    runner.run_interpreted("custom_op_cases.py")
