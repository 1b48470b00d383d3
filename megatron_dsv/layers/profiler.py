"""Sparsity profiler: how much of each head's attention mass a few keys hold.

Works on the true attention probabilities of the rows of sampled query blocks (cubes).
Token sparsity, as the paper defines it: per row, the share of keys outside the smallest
set holding `theta` of the mass, averaged over rows. Block sparsity, which drives the
per-head budget: per cube, the share of KV blocks outside the smallest set holding
`theta` of the cube's mean attention mass, averaged over cubes. It is per cube because one
selection serves all rows of a cube: the union of the rows' own critical blocks is what
the budget must pay for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smallest_cover(mass: torch.Tensor, theta: float) -> torch.Tensor:
    """Size of the smallest set of entries of each row of `mass` (rows sum to 1) holding theta."""
    cum = mass.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return ((cum < theta).sum(dim=-1) + 1).clamp(max=mass.shape[-1])


def block_mass(probs: torch.Tensor, block_kv: int) -> torch.Tensor:
    """Sum attention probabilities [..., S] per KV block -> [..., ceil(S / block_kv)]."""
    s = probs.shape[-1]
    pad = (-s) % block_kv
    return F.pad(probs, (0, pad)).unflatten(-1, ((s + pad) // block_kv, block_kv)).sum(-1)


def profile_logits(logits: torch.Tensor, cube_of_row: torch.Tensor, *, theta: float, block_kv: int):
    """Per-head sparsity of sampled rows.

    logits: [b, h, n, S] true pre-softmax logits (already scaled); cube_of_row: [n] query block of
    each row. Returns (token_sparsity [h], block_sparsity [h], block_mass [b, h, n, n_kv]).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    s = probs.shape[-1]
    mass = block_mass(probs, block_kv)
    tok = 1.0 - smallest_cover(probs, theta).float().mean(dim=(0, 2)) / s
    cubes, group = torch.unique(cube_of_row, return_inverse=True)
    cube_mass = torch.zeros(*mass.shape[:2], len(cubes), mass.shape[-1], device=mass.device).index_add_(2, group, mass)
    cube_mass /= torch.bincount(group, minlength=len(cubes)).view(1, 1, -1, 1)
    blk = 1.0 - smallest_cover(cube_mass, theta).float().mean(dim=(0, 2)) / mass.shape[-1]
    return tok, blk, mass


def selection_recall(mass: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor) -> torch.Tensor:
    """Share of the true attention mass held by the selected blocks, per head.

    mass: [b, h, n, n_kv] block mass of sampled rows; kv_idx [b, h, n, k_max] and kv_cnt [b, h, n]:
    the selection of each sampled row's query block. Returns [h].
    """
    valid = torch.arange(kv_idx.shape[-1], device=kv_idx.device) < kv_cnt.unsqueeze(-1)
    picked = mass.gather(-1, torch.where(valid, kv_idx.long(), 0))
    return (picked * valid).sum(-1).mean(dim=(0, 2))
