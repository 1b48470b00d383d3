"""Triton row block masses (the profiler's input) against row_block_mass_reference.

Run by tests/test_profiler.py in a child process with TRITON_INTERPRET=1 (CPU), or directly with
pytest on a CUDA machine (bf16 there).
"""

import pytest
import torch

from common import DEVICE, rel_err
from megatron_dsv.ops import row_mass, triton_row_mass
from megatron_dsv.ops.reference import row_block_mass_reference

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, s, d, block_kv", [
    (70, 200, 32, 16),    # a partial row tile, a partial last KV block
    (64, 256, 64, 64),    # whole tiles and blocks
    (5, 100, 24, 32),     # a head dim that is not a power of two; one partial tile
    (40, 1000, 16, 16),   # many spans, the last one partial
])
def test_row_block_mass_matches_reference(dtype, n, s, d, block_kv, monkeypatch):
    monkeypatch.setattr(triton_row_mass, "BLOCK_M", 32 if n < 64 else 64)
    monkeypatch.setattr(triton_row_mass, "SPAN", 4)   # spans of 4 KV blocks: most rows span several
    gen = torch.Generator().manual_seed(n * 1000 + s)
    b, h = 2, 3
    # Keys from a strided buffer (a fused projection's slice), queries spread so rows differ in sparsity.
    q = (torch.randn(n, b, h, d, generator=gen) * torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1)).to(DEVICE, dtype)
    k = torch.randn(s, b, h, 2 * d, generator=gen).to(DEVICE, dtype)[..., :d]
    scale = d ** -0.5
    mass = row_mass.row_block_mass(q, k, scale=scale, block_kv=block_kv, backend="triton")
    ref = row_block_mass_reference(q.double(), k.double(), scale=scale, block_kv=block_kv)
    assert mass.shape == ref.shape == (b, h, n, -(-s // block_kv)) and mass.dtype == torch.float32
    assert torch.allclose(mass.sum(-1).double().cpu(), torch.ones(b, h, n, dtype=torch.float64), atol=1e-4)
    # The reference in float64 of the same (rounded) inputs: half-precision products are exact in float32.
    assert rel_err(mass, ref) < 1e-5


def test_row_block_mass_auto_runs_the_reference_off_the_gpu():
    if DEVICE == "cuda":
        pytest.skip("CPU dispatch")
    q, k = torch.randn(3, 1, 2, 16), torch.randn(40, 1, 2, 16)
    assert torch.equal(row_mass.row_block_mass(q, k, scale=0.25, block_kv=16),
                       row_block_mass_reference(q, k, scale=0.25, block_kv=16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spread", [1.0, 30.0])   # 30: logits in the hundreds, rows near one-hot
def test_row_block_mass_default_launch(dtype, spread):
    """The kernel's own BLOCK_M and SPAN (no patch): several spans, the last of one KV block, a partial
    row tile."""
    gen = torch.Generator().manual_seed(int(spread))
    n, s, d, block_kv, b, h = 70, 2100, 64, 64, 1, 2
    q = (torch.randn(n, b, h, d, generator=gen) * spread).to(DEVICE, dtype)
    k = torch.randn(s, b, h, d, generator=gen).to(DEVICE, dtype)
    mass = row_mass.row_block_mass(q, k, scale=d ** -0.5, block_kv=block_kv, backend="triton")
    ref = row_block_mass_reference(q.double(), k.double(), scale=d ** -0.5, block_kv=block_kv)
    assert -(-(s // block_kv + 1) // triton_row_mass.SPAN) > 2
    assert rel_err(mass, ref) < 1e-5
