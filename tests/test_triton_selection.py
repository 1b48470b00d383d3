"""Triton block selection: under TRITON_INTERPRET=1 on CPU, compiled on a CUDA machine.

The cases live in tests/triton_cases/selection_cases.py and run in a child pytest process
(tests/triton_cases/runner.py says why).
"""

from triton_cases.runner import run_cases


def test_triton_select_blocks():
    run_cases("selection_cases.py")
