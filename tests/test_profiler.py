"""Profiler statistics on hand-made attention patterns."""

import math

import pytest
import torch
from triton_cases.runner import run_cases

from megatron_dsv.layers.budget import curve_on_grid
from megatron_dsv.layers.profiler import (cube_means, held_curve, profile_logits, recall_budget, row_logits,
                                          selection_recall, smallest_cover, token_rows)
from megatron_dsv.ops.reference import block_sums


def test_smallest_cover():
    mass = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert smallest_cover(mass, 0.75).tolist() == [2, 3]
    assert smallest_cover(mass, 0.9).tolist() == [3, 4]


def test_block_sparsity_is_per_cube_and_token_sparsity_per_row():
    """Two rows of one cube each attend to one key, in different KV blocks: each row alone needs one
    block, but the cube's single selection needs both."""
    s, block_kv = 64, 16
    logits = torch.full((1, 1, 2, s), -1e4)
    logits[0, 0, 0, 3] = 0.0    # row 0 -> key 3 (block 0)
    logits[0, 0, 1, 40] = 0.0   # row 1 -> key 40 (block 2)
    tok, blk, _, _, mass = profile_logits(logits, block_q=2, theta=0.9, block_kv=block_kv)
    assert math.isclose(float(tok), 1 - 1 / s, rel_tol=1e-6)
    assert math.isclose(float(blk), 1 - 2 / 4, rel_tol=1e-6)
    # In separate cubes each needs one block.
    _, blk_apart, _, _, _ = profile_logits(logits, block_q=1, theta=0.9, block_kv=block_kv)
    assert math.isclose(float(blk_apart), 1 - 1 / 4, rel_tol=1e-6)
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 1, 2))


def test_block_mass_partial_last_block_and_recall():
    probs = torch.full((1, 1, 1, 40), 1 / 40)
    mass = block_sums(probs, 16)
    torch.testing.assert_close(mass, torch.tensor([[[[16 / 40, 16 / 40, 8 / 40]]]]))
    kv_idx = torch.tensor([[[[2, 0, -1]]]], dtype=torch.int32)
    recall = selection_recall(mass, kv_idx, torch.tensor([[[2]]]))
    assert math.isclose(float(recall), 24 / 40, rel_tol=1e-6)


def test_recall_budget_pays_for_the_estimators_order():
    mass = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    # The oracle's order gives the smallest cover; a worse order needs more entries for the same mass.
    assert torch.equal(recall_budget(mass, 0.8), smallest_cover(mass, 0.8)[0])
    assert recall_budget(mass, 0.8, torch.tensor([[0.0, 3.0, 2.0, 1.0]])) == 4
    # Ties go to the lower index, as in the selection: [0, 1] hold 0.55, then 2 -> 0.85.
    assert recall_budget(mass, 0.8, torch.tensor([[1.0, 1.0, 0.0, 0.0]])) == 3


def test_recall_budget_holds_theta_on_average_over_cubes():
    """A cube that needs one block and one that needs all four: the mean of their covers (2.5 -> 3
    blocks) would leave the mean recall at 0.875; the budget is the fewest blocks whose selection
    holds theta on average, so the recall it gives is at least theta."""
    cube_mass = torch.tensor([[[[0.9, 0.1, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]]])  # [b, h, cubes, n_kv]
    theta = 0.9
    assert smallest_cover(cube_mass, theta).float().mean() == 2.5
    k = int(recall_budget(cube_mass[0, 0], theta))
    assert k == 4

    def recall(k):
        kv_idx = cube_mass.argsort(dim=-1, descending=True, stable=True)[..., :k].int()
        return float(selection_recall(cube_mass, kv_idx, torch.full((1, 1, 2), k)))

    assert recall(k) >= theta > recall(k - 1)
    # Through profile_logits: two rows per cube with exactly these block masses.
    logits = torch.log(cube_mass.repeat_interleave(2, dim=2).repeat_interleave(8, dim=-1) / 8 + 1e-30)
    _, blk, _, _, _ = profile_logits(logits, block_q=2, theta=theta, block_kv=8)
    assert math.isclose(float(blk), 1 - k / 4, abs_tol=1e-6)


def test_block_sparsity_follows_the_estimators_ranking():
    """With the estimator's block scores the block sparsity is what its selection needs: equal to the
    oracle's for the true ranking, lower (a larger budget) for a poor one."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 8, 64, generator=gen) * 3
    _, oracle, also_oracle, _, mass = profile_logits(logits, block_q=4, theta=0.9, block_kv=8)
    assert torch.equal(oracle, also_oracle)
    cube_mass = mass.view(1, 2, 2, 4, 8).mean(3)
    _, same, _, _, _ = profile_logits(logits, block_q=4, theta=0.9, block_kv=8, cube_scores=cube_mass)
    worse = profile_logits(logits, block_q=4, theta=0.9, block_kv=8, cube_scores=-cube_mass)
    assert torch.allclose(same, oracle) and (worse.block_sparsity < oracle).all()
    # The oracle's sparsity does not depend on the estimator.
    assert torch.equal(worse.oracle_block_sparsity, oracle)


def test_token_sparsity_reads_the_middle_row_of_each_cube():
    """token_rows: the middle row of each cube carries the token sparsity, the others do not change it;
    a single cube shorter than half a cube still gives one row."""
    s, block_q = 64, 8
    logits = torch.full((1, 1, 2 * block_q + 3, s), -1e4)
    logits[..., 0] = 0.0                           # every row: all mass on one key
    logits[0, 0, 0] = 0.0                          # row 0 (not read): uniform
    logits[0, 0, block_q + 1] = 0.0                # a row between the middle ones: uniform
    tok = profile_logits(logits, block_q=block_q, theta=0.9, block_kv=16)
    assert math.isclose(float(tok.token_sparsity), 1 - 1 / s, rel_tol=1e-6)
    logits[0, 0, block_q // 2] = 0.0               # the first cube's middle row: uniform
    tok = profile_logits(logits, block_q=block_q, theta=0.9, block_kv=16)
    assert float(tok.token_sparsity) < 1 - 1 / s - 0.2
    assert token_rows(3, block_q) == slice(2, None, block_q)


def test_a_partial_last_cube_is_the_mean_of_its_own_rows():
    """Rows come in cubes of block_q, the last one shorter (a sequence that ends inside a cube): every
    statistic is that of each cube's mean over its own rows."""
    gen = torch.Generator().manual_seed(5)
    b, h, rows, s, block_q, block_kv = 2, 3, 11, 64, 4, 8          # cubes of 4, 4 and 3 rows
    logits = torch.randn(b, h, rows, s, generator=gen) * 3
    scores = torch.randn(b, h, 3, s // block_kv, generator=gen)
    prof = profile_logits(logits, block_q=block_q, theta=0.9, block_kv=block_kv, cube_scores=scores)
    cubes = torch.stack([prof.block_mass[:, :, c:c + block_q].mean(2) for c in range(0, rows, block_q)], dim=2)
    torch.testing.assert_close(cube_means(prof.block_mass, block_q), cubes)
    per_head = (lambda t: t.transpose(0, 1).flatten(1, 2))  # noqa: E731  [h, b * cubes, n_kv]
    n_kv = s // block_kv
    torch.testing.assert_close(prof.oracle_block_sparsity, 1 - recall_budget(per_head(cubes), 0.9).float() / n_kv)
    torch.testing.assert_close(prof.block_sparsity,
                               1 - recall_budget(per_head(cubes), 0.9, per_head(scores)).float() / n_kv)
    torch.testing.assert_close(prof.mass_curve, curve_on_grid(held_curve(per_head(cubes), per_head(scores))).float())


def test_triton_row_block_mass():
    """The profiler's block masses from the Triton kernel (tests/triton_cases/row_mass_cases.py)."""
    run_cases("row_mass_cases.py")


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else []))
def test_row_logits_of_strided_rows_and_keys(dtype):
    """The token rows' logits q k^T [b, h, m, S] from the layer's sbhd views (keys a slice of a wider
    buffer, as a fused projection gives): float32 output, on the GPU from bf16 inputs as they are."""
    device = "cuda" if dtype == torch.bfloat16 else "cpu"
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(5, 2, 3, 16, generator=gen).to(device, dtype)
    k = torch.randn(40, 2, 3, 48, generator=gen).to(device, dtype)[..., 16:32]
    got = row_logits(q, k)
    want = torch.einsum("mbhd,sbhd->bhms", q.double(), k.double())
    assert got.dtype == torch.float32 and got.shape == (2, 3, 5, 40)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
