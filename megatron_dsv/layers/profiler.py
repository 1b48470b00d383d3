"""Sparsity profiler: how much of each head's attention mass a few keys hold.

Works on the true attention probabilities of sampled query rows. For every row it
finds the smallest set of keys (and of KV blocks) holding `theta` of the mass;
a head's sparsity is the share of keys (blocks) outside that set, averaged over rows.
The block-level figure drives the per-head budget (it is what a block-sparse kernel
needs); the token-level one is reported as the paper defines it.
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


def profile_logits(logits: torch.Tensor, *, theta: float, block_kv: int):
    """Per-head sparsity of sampled rows.

    logits: [b, h, n, S] true pre-softmax logits (already scaled).
    Returns (token_sparsity [h], block_sparsity [h], block_mass [b, h, n, n_kv]).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    s = probs.shape[-1]
    mass = block_mass(probs, block_kv)
    tok = 1.0 - smallest_cover(probs, theta).float().mean(dim=(0, 2)) / s
    blk = 1.0 - smallest_cover(mass, theta).float().mean(dim=(0, 2)) / mass.shape[-1]
    return tok, blk, mass


def selection_recall(mass: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor) -> torch.Tensor:
    """Share of the true attention mass held by the selected blocks, per head.

    mass: [b, h, n, n_kv] block mass of sampled rows; kv_idx [b, h, n, k_max] and kv_cnt [b, h, n]:
    the selection of each sampled row's query block. Returns [h].
    """
    valid = torch.arange(kv_idx.shape[-1], device=kv_idx.device) < kv_cnt.unsqueeze(-1)
    picked = mass.gather(-1, torch.where(valid, kv_idx.long(), 0))
    return (picked * valid).sum(-1).mean(dim=(0, 2))
