"""Triton block-sparse attention (forward, lse, dq/dk/dv): under TRITON_INTERPRET=1 on CPU, compiled on a
CUDA machine.

The cases live in tests/triton_cases/attention_cases.py and run in a child pytest process
(tests/triton_cases/runner.py says why).
"""

from triton_cases.runner import run_cases


def test_triton_block_sparse_attention():
    run_cases("attention_cases.py")


def test_passes_keep_each_span_within_the_l2_share(monkeypatch):
    """The number of passes follows a head's bytes against L2_SHARE of L2: on an H200's 60 MiB, 64k tokens
    of head dim 128 in bf16 (32 MiB of K and V per head) run in one pass, 128k in two, 256k in four; never
    more than MAX_PASSES or than there are blocks; no L2 (CPU) means one pass."""
    import torch

    from megatron_dsv.ops import triton_attention as ta

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(ta, "_l2_bytes", lambda device: 60 << 20 if device.type == "cuda" else 0)
    blocks = {64 << 10: 1024, 128 << 10: 2048, 256 << 10: 4096, 8 << 20: 131072}
    assert [ta._passes(n, 64, 128, 2, gpu) for n in blocks.values()] == [1, 2, 4, ta.MAX_PASSES]
    assert ta._passes(3, 64, 128, 2, gpu) == 1                 # 3 blocks: 96 KB
    assert ta._passes(2, 1 << 20, 128, 2, gpu) == 2            # never more passes than blocks
    assert ta._passes(4096, 64, 128, 2, torch.device("cpu")) == 1


def test_transposition_sorts_32_bit_keys_where_they_fit():
    """Keys in [0, span): int32 up to a span of 2**31 (largest key 2**31 - 1), int64 beyond; the lists built
    with either width are compared in the attention cases."""
    import torch

    from megatron_dsv.ops import triton_attention as ta

    assert ta._sort_key_dtype(16 * 1025 * 1024) == torch.int32          # 64k x 16 heads, blocks of 64
    assert ta._sort_key_dtype(2 ** 31) == torch.int32
    assert ta._sort_key_dtype(2 ** 31 + 1) == torch.int64


def test_forward_kernel_needs_a_positive_scale():
    """The forward kernel takes each row's max before scaling (max(c s) = c max(s) holds for c > 0 only): its
    wrapper refuses other scales, also where a caller skips block_sparse_attention's checks."""
    import pytest
    import torch

    from megatron_dsv.ops import triton_attention as ta

    q = torch.zeros(1, 64, 1, 32)
    idx, cnt = torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32)
    for scale in (0.0, -0.125, float("nan")):
        with pytest.raises(ValueError, match="scale must be positive"):
            ta._forward(q, q, q, idx, cnt, None, None, 64, 64, scale, "bshd")
