"""Sparsity profiler: how much of each head's attention mass a few keys hold.

Works on the true attention probabilities of the rows of sampled query blocks (cubes).
Token sparsity, as the paper defines it: per row, the share of keys outside the smallest
set holding `theta` of the mass, averaged over rows (one sampled row per cube, its middle one:
token_rows; it is a diagnostic, and sorting whole rows was the largest part of a profile step's
GPU time, 4.9 of 21 ms over dense with every 8th row at 16k tokens, bench/results/step_h200/s9).
Block sparsity, which drives the per-head budget: the share of KV blocks outside the fewest
blocks k that, selected per cube in the estimator's ranking (the order the selection takes
them in), hold `theta` of the cubes' attention mass on average. That average is what the
selection's recall measures, so a budget of k blocks gives each head a recall of about
`theta` on the profiled rows. A cover per cube, averaged over cubes, would not: one k serves
every cube, and the cubes whose attention spreads over more blocks than the mean lose more
mass than the others gain. An imprecise estimator ranks blocks worse, so it needs a larger k
for the same mass instead of the selection silently missing mass; the oracle block sparsity
(blocks ranked by their true mass) says how much sparsity a better estimator could add. It
is per cube because one selection serves all rows of a cube: the union of the rows' own
critical blocks is what the budget must pay for.
The mass curve, per head: the mean mass the first k blocks of each cube hold in the estimator's
ranking, for every k, on the density grid of ``budget.py`` (what the compute-target policy
spreads blocks by).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..ops.reference import block_sums
from .budget import curve_on_grid
from .predictor import bmm_float32


def token_rows(n_rows: int, block_q: int) -> slice:
    """The sampled rows (whole cubes of block_q rows, in order) the token sparsity reads: each cube's middle
    row (a row within the last cube where a single partial cube is shorter)."""
    return slice(min(block_q // 2, n_rows - 1), None, block_q)


def smallest_cover(mass: torch.Tensor, theta: float) -> torch.Tensor:
    """Size of the smallest set of entries of each row of `mass` (rows sum to 1) holding theta."""
    cum = mass.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return ((cum < theta).sum(dim=-1) + 1).clamp(max=mass.shape[-1])


def held_curve(mass: torch.Tensor, scores: torch.Tensor = None) -> torch.Tensor:
    """Mean over the rows of the mass each row's first k + 1 entries hold, taken by descending
    `scores` (ties to the lower index, as the selection breaks them; default: by mass, the oracle).
    mass [..., rows, n] (rows sum to 1) -> [..., n]."""
    if scores is None:   # the oracle's order: the sorted masses themselves, no gather
        taken = mass.sort(dim=-1, descending=True).values
    else:
        taken = mass.gather(-1, torch.sort(scores, dim=-1, descending=True, stable=True).indices)
    return taken.cumsum(dim=-1).mean(dim=-2)


def recall_budget(mass: torch.Tensor, theta: float, scores: torch.Tensor = None) -> torch.Tensor:
    """Fewest entries k such that each row's first k entries (in the order of `held_curve`) hold theta
    of the mass on average over the rows. mass [..., rows, n] -> [...]."""
    return _fewest(held_curve(mass, scores), theta)


def _fewest(held: torch.Tensor, theta: float) -> torch.Tensor:
    return ((held < theta).sum(dim=-1) + 1).clamp(max=held.shape[-1])


def cube_means(rows: torch.Tensor, block_q: int) -> torch.Tensor:
    """Mean over the rows of each cube: rows [b, h, n, m], whole cubes of block_q consecutive rows in
    order (the last may hold fewer) -> [b, h, ceil(n / block_q), m]. The cube sizes follow from n, so
    the host reads nothing from the device (grouping by torch.unique / bincount waited for it), and a
    sum over a reshape adds in a fixed order on every device (index_add_ adds with atomics on the GPU)."""
    n = rows.shape[2]
    cubes = -(-n // block_q)
    padded = F.pad(rows, (0, 0, 0, cubes * block_q - n))
    means = padded.unflatten(2, (cubes, block_q)).sum(3)
    means[:, :, :-1] /= block_q
    means[:, :, -1] /= n - (cubes - 1) * block_q
    return means


class RowProfile(NamedTuple):
    token_sparsity: torch.Tensor          # [h]
    block_sparsity: torch.Tensor          # [h], blocks in the estimator's ranking
    oracle_block_sparsity: torch.Tensor   # [h], blocks in the ranking by true mass
    mass_curve: torch.Tensor              # [h, CURVE_POINTS + 1], blocks in the estimator's ranking
    block_mass: torch.Tensor              # [b, h, n, n_kv]


def row_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q k^T [b, h, m, S] float32 of rows q [m, b, h, d] and keys k [S, b, h, d] (the layer's layout), by
    bmm_float32: on the GPU without a float32 copy of the keys."""
    m, b, h, d = q.shape
    s = k.shape[0]
    return bmm_float32(q.reshape(m, b * h, d).transpose(0, 1), k.reshape(s, b * h, d).permute(1, 2, 0)).view(b, h, m, s)


def profile_mass(mass: torch.Tensor, token_logits: torch.Tensor, *, block_q: int, theta: float,
                 cube_scores: torch.Tensor = None) -> RowProfile:
    """Per-head sparsity of sampled rows from their block masses.

    mass: [b, h, n, n_kv] the share of each row's attention mass in every KV block (ops.row_mass), for
    the rows of whole query blocks (cubes) of block_q rows, in order (the last cube may hold fewer);
    token_logits: [b, h, m, S] true pre-softmax logits (already scaled) of those rows' token_rows, for
    the token sparsity; cube_scores: [b, h, cubes, n_kv] the estimator's block scores of the cubes
    (None: the oracle's order, and block_sparsity equals oracle_block_sparsity).
    """
    probs = torch.softmax(token_logits.float(), dim=-1)
    tok = 1.0 - smallest_cover(probs, theta).float().mean(dim=(0, 2)) / probs.shape[-1]
    n_kv = mass.shape[-1]
    cube_mass = _per_head(cube_means(mass, block_q))
    oracle_held = held_curve(cube_mass)
    held = oracle_held if cube_scores is None else held_curve(cube_mass, _per_head(cube_scores))
    oracle = 1.0 - _fewest(oracle_held, theta).float() / n_kv
    blk = 1.0 - _fewest(held, theta).float() / n_kv
    return RowProfile(tok, blk, oracle, curve_on_grid(held).float(), mass)


def profile_logits(logits: torch.Tensor, *, block_q: int, theta: float, block_kv: int,
                   cube_scores: torch.Tensor = None) -> RowProfile:
    """profile_mass of rows given by their logits [b, h, n, S] (true, pre-softmax, already scaled)."""
    mass = block_sums(torch.softmax(logits.float(), dim=-1), block_kv)
    return profile_mass(mass, logits[:, :, token_rows(logits.shape[2], block_q)], block_q=block_q,
                        theta=theta, cube_scores=cube_scores)


def _per_head(t: torch.Tensor) -> torch.Tensor:
    """[b, h, cubes, n_kv] -> [h, b * cubes, n_kv]: each head's cubes of all batch elements."""
    return t.transpose(0, 1).flatten(1, 2)


def selection_recall(mass: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor) -> torch.Tensor:
    """Share of the true attention mass held by the selected blocks, per head.

    mass: [b, h, n, n_kv] block mass of sampled rows; kv_idx [b, h, n, k_max] and kv_cnt [b, h, n]:
    the selection of each sampled row's query block. Returns [h].
    """
    valid = torch.arange(kv_idx.shape[-1], device=kv_idx.device) < kv_cnt.unsqueeze(-1)
    picked = mass.gather(-1, torch.where(valid, kv_idx.long(), 0))
    return (picked * valid).sum(-1).mean(dim=(0, 2))
