"""Profiler statistics on hand-made attention patterns."""

import math

import torch

from megatron_dsv.layers.profiler import block_mass, profile_logits, selection_recall, smallest_cover


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
    tok, blk, mass = profile_logits(logits, torch.tensor([5, 5]), theta=0.9, block_kv=block_kv)
    assert math.isclose(float(tok), 1 - 1 / s, rel_tol=1e-6)
    assert math.isclose(float(blk), 1 - 2 / 4, rel_tol=1e-6)
    # In separate cubes each needs one block.
    _, blk_apart, _ = profile_logits(logits, torch.tensor([5, 6]), theta=0.9, block_kv=block_kv)
    assert math.isclose(float(blk_apart), 1 - 1 / 4, rel_tol=1e-6)
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 1, 2))


def test_block_mass_partial_last_block_and_recall():
    probs = torch.full((1, 1, 1, 40), 1 / 40)
    mass = block_mass(probs, 16)
    torch.testing.assert_close(mass, torch.tensor([[[[16 / 40, 16 / 40, 8 / 40]]]]))
    kv_idx = torch.tensor([[[[2, 0, -1]]]], dtype=torch.int32)
    recall = selection_recall(mass, kv_idx, torch.tensor([[[2]]]))
    assert math.isclose(float(recall), 24 / 40, rel_tol=1e-6)
