"""The attention mass outside the selected blocks, estimated from pooled blocks (an option).

Block-sparse attention drops the mass of every KV block a query block did not select. At a fixed
compute budget on models whose attention is diffuse at block level, that is most of the mass (at 10%
of 64-token blocks, layers of the `small` example hold 0.2-0.5 of it), and the model pays for it in
quality. This op adds the unselected blocks back at block granularity: KV block j stands for its n_j
keys as one key at their mean k_j, with logit q . k_j * scale + log n_j, and value their mean v_j.
That is exact when a block's keys are equal, and otherwise, by Jensen's inequality, a lower bound of
the block's log-sum-exp; the selected blocks keep their exact contribution. The two parts are merged
through their log-sum-exps, so the result is one softmax over exact selected keys and pooled others.

Cost: one [queries x KV blocks] product per head, 1/block_kv of dense attention's, in plain torch
(memory [b, h, Sq, n_kv] in float32, float64 for float64 inputs): meant for measuring whether recovering the mass closes the
quality gap before it earns a kernel, and for sequences where that buffer fits.
"""

from __future__ import annotations

import torch

from .layout import from_bhsd, to_bhsd
from .reference import _pad_seq


def coarse_remainder(q, k, v, kv_idx, kv_cnt, out, lse, *, block_q: int, block_kv: int, scale: float,
                     layout: str) -> torch.Tensor:
    """out, lse of block-sparse attention over (kv_idx, kv_cnt) -> out with the unselected blocks added
    as pooled keys and values. Differentiable in q, k, v, out and lse; returns q's dtype and layout."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh = (to_bhsd(t, layout).to(acc) for t in (q, k, v))
    b, h, s_q, d = qh.shape
    s_kv = kh.shape[2]
    n_kv = -(-s_kv // block_kv)
    n_q = kv_idx.shape[2]
    counts = torch.clamp(s_kv - torch.arange(n_kv, device=q.device) * block_kv, max=block_kv).to(acc)
    k_mean = _pad_seq(kh, block_kv).view(b, h, n_kv, block_kv, d).sum(3) / counts.view(-1, 1)
    v_mean = _pad_seq(vh, block_kv).view(b, h, n_kv, block_kv, vh.shape[-1]).sum(3) / counts.view(-1, 1)

    slot_ok = torch.arange(kv_idx.shape[-1], device=q.device) < kv_cnt.unsqueeze(-1)
    selected = torch.zeros(b, h, n_q, n_kv + 1, dtype=torch.bool, device=q.device)  # column n_kv: unused slots
    selected.scatter_(-1, torch.where(slot_ok, kv_idx.long(), n_kv), True)
    selected = selected[..., :n_kv].repeat_interleave(block_q, dim=2)[:, :, :s_q]  # [b, h, Sq, n_kv]

    logits = torch.einsum("bhsd,bhjd->bhsj", qh, k_mean) * scale + counts.log()
    logits = logits.masked_fill(selected, float("-inf"))
    lse = lse.to(acc)
    lse_all = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))  # [b, h, Sq]
    ref = torch.where(torch.isfinite(lse_all), lse_all, 0.0)  # rows without any key: both parts -inf
    fine = torch.exp(lse - ref).unsqueeze(-1) * to_bhsd(out, layout).to(acc)
    coarse = torch.einsum("bhsj,bhjd->bhsd", torch.exp(logits - ref.unsqueeze(-1)), v_mean)
    return from_bhsd((fine + coarse).to(q.dtype), layout)
