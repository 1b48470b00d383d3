"""Shared helpers of the Triton kernel cases (run under TRITON_INTERPRET=1 on CPU, or on CUDA).

These files are not collected by the outer pytest run (their names do not start with test_);
tests/test_triton_*.py run them in a child pytest process (runner.py): compiled on a CUDA machine,
elsewhere with TRITON_INTERPRET=1 set before triton is first imported.
"""

import os

import pytest
import torch

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton cases need CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def random_block_mask(b, h, n_q, n_kv, *, counts, gen, k_max=None):
    """kv_idx [b, h, n_q, k_max] (ascending ids, -1 past the count) and kv_cnt for given counts.

    counts: int tensor [b, h, n_q] with values in [0, n_kv].
    """
    k_max = int(counts.max().clamp_min(1)) if k_max is None else k_max
    kv_idx = torch.full((b, h, n_q, k_max), -1, dtype=torch.int32)
    for bi in range(b):
        for hi in range(h):
            for qi in range(n_q):
                c = int(counts[bi, hi, qi])
                ids = torch.randperm(n_kv, generator=gen)[:c].sort().values
                kv_idx[bi, hi, qi, :c] = ids.to(torch.int32)
    return kv_idx, counts.to(torch.int32)


@pytest.fixture
def poison(monkeypatch):
    """Fill every Triton kernel output with NaN before the launch, so unwritten elements fail."""
    from megatron_dsv.ops import triton_attention

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_attention, "_empty", nan_empty)
