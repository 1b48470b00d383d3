"""Triton block selection under TRITON_INTERPRET=1 on CPU.

The cases live in tests/triton_cases/selection_cases.py and run in a child pytest process
(tests/triton_cases/runner.py says why); on a CUDA machine run that file directly with pytest.
"""

from triton_cases.runner import run_interpreted


def test_triton_select_blocks_interpreted():
    run_interpreted("selection_cases.py")
