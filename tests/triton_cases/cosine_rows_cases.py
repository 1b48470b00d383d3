"""The Triton row terms of the predictor's loss (ops/triton_cosine_rows.py) against cosine_rows_reference.

Run by tests/test_layer.py in a child process with TRITON_INTERPRET=1 (CPU), or directly with pytest on a
CUDA machine.
"""

import pytest
import torch

from common import DEVICE, rel_err
from megatron_dsv.ops import cosine_rows, triton_cosine_rows
from megatron_dsv.ops.reference import cosine_rows_reference


@pytest.mark.parametrize("h, b, n, d", [
    (2, 2, 40, 64),   # a partial row tile
    (3, 1, 32, 24),   # a head dim that is not a power of two; whole tiles
    (1, 2, 7, 16),    # fewer rows than a tile
])
def test_cosine_rows_match_reference(h, b, n, d, monkeypatch):
    monkeypatch.setattr(triton_cosine_rows, "BLOCK_R", 16)
    gen = torch.Generator().manual_seed(h * 1000 + n * 10 + d)
    k = torch.randn(b, h, 3 * d, d, generator=gen, dtype=torch.float64)
    g = k.transpose(-1, -2) @ k                                      # a Gram matrix [b, h, d, d]
    q = torch.randn(h, b, n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 4.0, n).view(n, 1)
    w = torch.randn(h, d, d, generator=gen, dtype=torch.float64) / d
    p = (q.reshape(h, b * n, d) @ w).view(h, b, n, d)
    p[0, 0, 3] = 0.0   # a row whose predicted logits are all zero: |p| clamped, no term along P G
    pq = torch.cat([p, q], dim=2)
    pq_g = pq @ g.transpose(0, 1)
    scale, weight = d ** -0.5, 0.37
    omc, grad = cosine_rows.cosine_rows(pq.float().to(DEVICE), pq_g.float().to(DEVICE), scale=scale,
                                        weight=weight, backend="triton")
    ref_omc, ref_grad = cosine_rows_reference(pq, pq_g, scale=scale, weight=weight)
    assert omc.shape == ref_omc.shape == (h, b, n) and grad.shape == ref_grad.shape == (h, b, n, d)
    assert omc.dtype == grad.dtype == torch.float32
    omc, grad = omc.cpu(), grad.cpu()
    assert rel_err(omc, ref_omc) < 1e-5 and rel_err(grad, ref_grad) < 1e-5
    assert float(omc[0, 0, 3]) == 1.0 and torch.isfinite(grad).all()


def test_cosine_rows_auto_runs_the_reference_off_the_gpu():
    if DEVICE == "cuda":
        pytest.skip("CPU dispatch")
    pq, pq_g = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    got = cosine_rows.cosine_rows(pq, pq_g, scale=0.5, weight=1.0)
    want = cosine_rows_reference(pq, pq_g, scale=0.5, weight=1.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
