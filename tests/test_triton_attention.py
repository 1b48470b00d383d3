"""Triton block-sparse attention (forward, lse, dq/dk/dv) under TRITON_INTERPRET=1 on CPU.

The cases live in tests/triton_cases/attention_cases.py and run in a child pytest process
(tests/triton_cases/runner.py says why); on a CUDA machine run that file directly with pytest
to check the compiled kernels (bfloat16 included).
"""

from triton_cases.runner import run_interpreted


def test_triton_block_sparse_attention_interpreted():
    run_interpreted("attention_cases.py")
