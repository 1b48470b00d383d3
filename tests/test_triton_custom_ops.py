"""Triton kernels as torch custom ops (opcheck, torch.compile): under TRITON_INTERPRET=1 on CPU, compiled on
a CUDA machine.

The cases live in tests/triton_cases/custom_op_cases.py and run in a child pytest process
(tests/triton_cases/runner.py says why).
"""

from triton_cases.runner import run_cases


def test_triton_custom_ops():
    run_cases("custom_op_cases.py")
