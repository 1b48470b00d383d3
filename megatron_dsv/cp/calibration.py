"""The planner's cost model measured on the machine it plans for.

``CostModel()``'s defaults are assumptions (H100 kernel rates, nominal NVLink bandwidth). On 2 H200s
they put the planner's predicted times 1.7-2.3x below the measured ones and made it pick a plan
1.13-1.24x slower than the best. :func:`measure_cost_model` replaces every assumption the planner
uses with a measurement over the CP group and on the local GPU:

- head all-to-all bandwidth (``intra_node_gbps``): the head all-to-all itself (``seq_to_head`` of the
  q, k and v shards, U = P), bytes a rank sends to its peers per second, its buffer copies included
  (the raw ``all_to_all_single`` and ring point-to-point rates are reported beside it);
- per-message latency (``latency_s``): the same collective with 4 KiB per peer;
- dense rate (``dense_tflops``): dense attention forward + backward of S / P queries over the whole
  sequence, all heads;
- sparse rate curve (``sparse_curve``): selection + block-sparse attention forward + backward at the
  same shape for several densities (every head at one density), as effective TFLOP/s of the
  computed blocks, selection included.

Rates are measured at the shape the planner will see, because both kernels' rates depend on the
sequence length and the head count. What a rank holding part of the sequence pays beyond its share
of the compute and the exchange's bytes (CostModel's split factors) is not measured here: it was
fitted on 2 and 4 H200s (bench/cp_model_check.py) and stays ``base``'s. bench/cp_bench.py runs this
and compares the calibrated model's predictions with every plan's measured time. A layer does not:
it times its short list of plans instead (plan_search.py), which needs no model to be right.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist

from ..timing import time_ms
from ..ops import block_sparse_attention, dense_attention, select_blocks
from .all_to_all import seq_to_head
from .groups import HybridCPGroup
from .planner import CostModel, Shape

DENSITIES = (0.02, 0.05, 0.1, 0.2, 0.35)


def slowest(group: HybridCPGroup, ms: float) -> float:
    """The largest value over the CP ranks (the slowest rank sets the step)."""
    t = torch.tensor([ms], dtype=torch.float64, device=group.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group.group)
    return float(t.item())


def measure_links(group: HybridCPGroup, *, nbytes: int = 64 << 20, dtype=torch.bfloat16, iters: int = 5) -> dict:
    """Per-GPU all-to-all and ring point-to-point bandwidth (GB/s, bytes sent to peers per second) and the
    latency of a small all-to-all (seconds per peer), over the whole CP group."""
    P = group.size
    device = group.device
    elem = torch.empty((), dtype=dtype).element_size()

    def a2a(per_peer):
        n = max(1, per_peer // elem) * P
        send, recv = torch.empty(n, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device)
        return lambda: dist.all_to_all_single(recv, send, group=group.group)

    def ring(per_peer):
        n = max(1, per_peer // elem)
        send, recv = torch.empty(n, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device)
        me = group.index
        to, frm = group.ranks[(me + 1) % P], group.ranks[(me - 1) % P]

        def run():
            for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, to, group.group),
                                             dist.P2POp(dist.irecv, recv, frm, group.group)]):
                w.wait()
        return run

    big = nbytes // max(1, P - 1)
    raw_ms = slowest(group, time_ms(a2a(big), device, iters=iters))
    p2p_ms = slowest(group, time_ms(ring(nbytes), device, iters=iters))
    small_ms = slowest(group, time_ms(a2a(4096), device, iters=iters))
    return dict(raw_a2a_gbps=big * (P - 1) / (raw_ms * 1e-3) / 1e9, p2p_gbps=nbytes / (p2p_ms * 1e-3) / 1e9,
                latency_s=small_ms * 1e-3 / max(1, P - 1), raw_a2a_ms=raw_ms, p2p_ms=p2p_ms, small_a2a_ms=small_ms,
                bytes_per_peer=big)


def measure_head_all_to_all(group: HybridCPGroup, shape: Shape, *, dtype=torch.bfloat16, iters: int = 5) -> dict:
    """GB/s per GPU of the head all-to-all as the CP path runs it: seq_to_head of this rank's q, k and v
    shards [S / P, b, H, d] over U = min(P, heads) ranks, bytes sent to peers per second."""
    P, device = group.size, group.device
    U = max(u for u in range(1, min(P, shape.heads) + 1) if P % u == 0)
    if U == 1:
        return dict(head_a2a_gbps=None, head_a2a_ms=0.0, U=1)
    qkv = [torch.empty(shape.seq_len // P, shape.batch, shape.heads, shape.head_dim, dtype=dtype, device=device)
           for _ in range(3)]
    heads_of = tuple(tuple(h for h in range(shape.heads) if h * U // shape.heads == u) for u in range(U))
    ms = slowest(group, time_ms(lambda: [seq_to_head(x, group, U, heads_of) for x in qkv], device, iters=iters))
    sent = sum(x.numel() * x.element_size() for x in qkv) * (U - 1) / U
    return dict(head_a2a_gbps=sent / (ms * 1e-3) / 1e9, head_a2a_ms=ms, U=U)


def kv_union(kv_idx: torch.Tensor, kv_cnt: torch.Tensor, n_kv: int, R: int) -> float:
    """CostModel.kv_union measured on a selection of the whole sequence (kv_idx [b, h, n_q, k_max]): the KV
    blocks one of R sequence segments selects (deduplicated, per head), as a multiple of one query block's
    mean budget, averaged over segments and heads."""
    b, h, n_q, _ = kv_idx.shape
    valid = torch.arange(kv_idx.shape[-1], device=kv_idx.device) < kv_cnt.unsqueeze(-1)
    seg_of = (torch.arange(n_q, device=kv_idx.device) * R // n_q).view(1, 1, -1, 1)
    key = ((torch.arange(b * h, device=kv_idx.device).view(b, h, 1, 1) * R + seg_of) * n_kv + kv_idx.long())
    unique = torch.unique(key[valid]).numel() / (b * h * R)
    budget = kv_cnt.double().mean().item()
    return max(1.0, unique / budget) if budget > 0 else 1.0


def measure_kernels(shape: Shape, P: int, *, device: torch.device, dtype=torch.bfloat16,
                    densities: Sequence[float] = DENSITIES, backend: str = "auto", seed: int = 0,
                    iters: int = 5) -> dict:
    """Dense and sparse (selection included) forward + backward rates of S / P queries over the whole
    sequence, all heads, on this device. Returns dense_tflops, sparse_curve ((density, TFLOP/s), ...)
    and the times behind them."""
    S, H, d, b, r = shape.seq_len, shape.heads, shape.head_dim, shape.batch, shape.lr_rank
    s_q = max(shape.block_q, (S // P) // shape.block_q * shape.block_q)
    gen = torch.Generator(device=device).manual_seed(seed)
    mk = lambda n, width: torch.randn(b, n, H, width, generator=gen, device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(s_q, d).requires_grad_(), mk(S, d).requires_grad_(), mk(S, d).requires_grad_()
    q_lr, k_lr = mk(s_q, r), mk(S, r)
    do = mk(s_q, d)
    full_flops = 4.0 * b * s_q * S * d * H * 3.5   # forward + backward (backward = 2.5 forward)

    def dense():
        dense_attention(q, k, v, layout="bshd").backward(do)

    n_kv = shape.n_kv

    def sparse(density):
        topk = max(1, round(density * n_kv))

        def run():
            kv_idx, kv_cnt = select_blocks(q_lr, k_lr, topk, block_q=shape.block_q, block_kv=shape.block_kv,
                                           backend=backend)
            block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q=shape.block_q, block_kv=shape.block_kv,
                                   layout="bshd", backend=backend).backward(do)
        return run, topk / n_kv

    dense_ms = time_ms(dense, device, iters=iters)
    curve, sparse_ms = [], {}
    for x in densities:
        run, real = sparse(x)
        if round(real, 6) in sparse_ms:   # short sequences: two densities round to one block count
            continue
        ms = time_ms(run, device, iters=iters)
        sparse_ms[round(real, 6)] = ms
        curve.append((round(real, 6), real * full_flops / (ms * 1e-3) / 1e12))
    return dict(dense_tflops=full_flops / (dense_ms * 1e-3) / 1e12, sparse_curve=tuple(curve), dense_ms=dense_ms,
                sparse_ms=sparse_ms, queries=s_q)


def measure_cost_model(group: HybridCPGroup, shape: Shape, *, base: CostModel = CostModel(), dtype=torch.bfloat16,
                       backend: str = "auto", iters: int = 5):
    """(CostModel with every measured field replaced, the measurements) on this CP group and device.
    Kernel rates are measured on every rank and the slowest rank's kept (min rate), so every rank gets
    the same model. The all-to-all runs over the whole group: on one node that is the NVLink figure the
    planner calls intra_node_gbps; inter_node_gbps stays ``base``'s, and so does kv_union, which depends on
    what the predictor selects rather than on the machine (:func:`kv_union` measures it on a selection)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    links = measure_links(group, dtype=dtype, iters=iters)
    links.update(measure_head_all_to_all(group, shape, dtype=dtype, iters=iters))
    kern = measure_kernels(shape, group.size, device=device, dtype=dtype, backend=backend, iters=iters)
    rates = torch.tensor([kern["dense_tflops"]] + [r for _, r in kern["sparse_curve"]], dtype=torch.float64,
                         device=group.device)
    dist.all_reduce(rates, op=dist.ReduceOp.MIN, group=group.group)
    curve = tuple((x, float(r)) for (x, _), r in zip(kern["sparse_curve"], rates[1:].tolist()))
    cost = dataclasses.replace(base, dense_tflops=float(rates[0]), sparse_curve=curve,
                               intra_node_gbps=links["head_a2a_gbps"] or links["raw_a2a_gbps"],
                               latency_s=links["latency_s"],
                               bytes_per_elem=torch.empty((), dtype=dtype).element_size())
    return cost, dict(links=links, kernels=kern, device=_device_name(device), P=group.size)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
