"""Kernel benchmark: Triton block-sparse attention + selection against dense and FlexAttention.

For each sequence length S, block size and density it times, in one process on one GPU:
  selection (select_blocks, backend triton), sparse forward, sparse forward+backward,
  SDPA cuDNN and SDPA flash dense forward / forward+backward,
  FlexAttention on the identical block mask (BlockMask.from_kv_blocks, mask build timed apart).
Effective TFLOP/s count only computed blocks: 4*b*h*S^2*d*density forward, x2.5 for backward.
Also checks the sparse output against Flex (same mask) and, at density 1, against cuDNN.

    python bench/kernels.py --seqs 16384 65536 131072 --json bench/results/kernels_h100.json
    python bench/kernels.py --tune   # launch-config variants at the target point
    python bench/kernels.py --seqs 65536 --densities 0.1 --no-flex --resources  # + what each kernel uses
    python bench/kernels.py --seqs 65536 131072 --densities 0.1 0.05 --block-q 64 --block-kvs 64 --peers
    python bench/kernels.py --seqs 16384 --densities 0.1 --block-q 64 --block-kvs 64 --no-flex --heads 8 \
        --head-dim 64 --rank 32 --graphed   # + selection and forward replayed from CUDA graphs

Writes JSON (device name included) and prints a table last. Does not import megatron.
The kernels are timed one after another in a fixed order (ours first, the peers after): on an H200 one kernel
timed minutes apart in one process moved by up to 7%, so for the ratio of ours to cuDNN's block-sparse kernel
use bench/auto_choice.py, which times the two in A B B A rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_dsv.ops import triton_attention as ta  # noqa: E402
from megatron_dsv.ops import triton_selection as ts  # noqa: E402
from megatron_dsv.ops.block_sparse import block_sparse_attention  # noqa: E402
from megatron_dsv.ops.selection import select_blocks  # noqa: E402

H, D, RANK = 16, 128, 16
DTYPE = torch.bfloat16


def ms(fn, rep=300):
    return do_bench(fn, warmup=50, rep=rep, return_mode="median")


def fwd_flops(s_q, s_kv, density, b=1):
    return 4.0 * b * H * s_q * s_kv * D * density


def tflops(flops, t_ms):
    return flops / (t_ms * 1e-3) / 1e12 if t_ms else None


def rel_err(x, ref):
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm())


def inputs(s, gen_seed=0):
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    q, k, v, do = (torch.randn(1, s, H, D, device="cuda", dtype=DTYPE, generator=g) for _ in range(4))
    q_lr, k_lr = (torch.randn(1, s, H, RANK, device="cuda", dtype=DTYPE, generator=g) for _ in range(2))
    return q, k, v, do, q_lr, k_lr


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """fn() captured as one CUDA graph, after three warm-up calls (compiles, autotuning) on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_ms(fn):
    """ms of fn replayed from a CUDA graph, as a DSV layer's training steps run selection and attention
    at short lengths: no host work per call (each replay is one launch)."""
    return ms(capture_graph(fn).replay)


def time_fwd_bwd(fwd, q, k, v, do):
    """(forward ms, forward+backward ms, peak bytes of forward+backward above the inputs)."""
    t_f = ms(lambda: fwd(q, k, v))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def step():
        out = fwd(qg, kg, vg)
        torch.autograd.grad(out, (qg, kg, vg), do)

    t_fb = ms(step)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return t_f, t_fb, torch.cuda.max_memory_allocated() - base


def sdpa(backend):
    def fwd(q, k, v):
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)
    return fwd


_FLEX = None
_FLEX_FAILED: set = set()


def flex_fn():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        torch._dynamo.config.cache_size_limit = 64  # one graph per (S, block size, kernel options)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex_block_mask(kv_idx, kv_cnt, s, block_q, block_kv):
    """The same block mask as a Flex BlockMask: every selected block is a full block.

    The mask_mod (reading the dense block map) is what eager Flex evaluates; the compiled kernel
    skips it on full blocks, so it costs nothing there.
    """
    from torch.nn.attention.flex_attention import BlockMask
    b, h, n_q, k_max = kv_idx.shape
    n_kv = -(-s // block_kv)
    valid = torch.arange(k_max, device=kv_idx.device) < kv_cnt.unsqueeze(-1)
    full_idx = torch.zeros(b, h, n_q, n_kv, dtype=torch.int32, device=kv_idx.device)
    full_idx[..., :k_max] = torch.where(valid, kv_idx, 0)
    dense = torch.zeros(b, h, n_q, n_kv + 1, dtype=torch.bool, device=kv_idx.device)
    dense.scatter_(-1, torch.where(valid, kv_idx, n_kv).long(), True)
    dense = dense[..., :n_kv]

    def mask_mod(b_, h_, q_i, kv_i):
        return dense[b_, h_, q_i // block_q, kv_i // block_kv]

    none = torch.zeros_like(kv_cnt)
    return BlockMask.from_kv_blocks(none, torch.zeros_like(full_idx), kv_cnt, full_idx,
                                    BLOCK_SIZE=(block_q, block_kv), mask_mod=mask_mod, seq_lengths=(s, s))


def run_flex(q, k, v, do, kv_idx, kv_cnt, s, block_q, block_kv, ref_out):
    rec = {}
    t0 = time.perf_counter()
    mask = flex_block_mask(kv_idx, kv_cnt, s, block_q, block_kv)
    torch.cuda.synchronize()
    rec["flex_mask_build_ms_first"] = (time.perf_counter() - t0) * 1e3
    rec["flex_mask_build_ms"] = ms(lambda: flex_block_mask(kv_idx, kv_cnt, s, block_q, block_kv), rep=100)
    flex = flex_fn()
    errors = []
    # Flex needs its kernel tiles to divide the sparse block: forward BLOCK_M/N, backward
    # BLOCK_M1/N1 (dk/dv) and BLOCK_M2/N2 (dq).
    bn = min(block_kv, 64)
    tile_options = (
        None,
        {"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_M1": 64, "BLOCK_N1": bn, "BLOCK_M2": 64, "BLOCK_N2": bn},
        {"BLOCK_M": 64, "BLOCK_N": bn, "BLOCK_M1": 32, "BLOCK_N1": bn, "BLOCK_M2": 64, "BLOCK_N2": bn},
        {"BLOCK_M": 64, "BLOCK_N": bn, "BLOCK_M1": bn, "BLOCK_N1": bn, "BLOCK_M2": bn, "BLOCK_N2": bn,
         "num_warps": 4, "num_stages": 1},
        {"BACKEND": "TRITON", "BLOCK_M": 64, "BLOCK_N": bn, "BLOCK_M1": bn, "BLOCK_N1": bn, "BLOCK_M2": bn,
         "BLOCK_N2": bn},
    )
    for opts in tile_options:
        if (block_q, block_kv, str(opts)) in _FLEX_FAILED:  # failed at an earlier S: skip the compile
            continue

        def fwd(q_, k_, v_, opts=opts):
            out = flex(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), block_mask=mask,
                       kernel_options=opts)
            return out.transpose(1, 2)
        try:
            if "flex_fwd_ms" not in rec:  # the forward alone, even where the backward does not compile
                out = fwd(q, k, v)
                rec["flex_err_vs_sparse"] = rel_err(out, ref_out)
                rec["flex_fwd_ms"] = ms(lambda: fwd(q, k, v))
                rec["flex_fwd_kernel_options"] = opts
            _, rec["flex_fwdbwd_ms"], rec["flex_peak_bytes"] = time_fwd_bwd(fwd, q, k, v, do)
            rec["flex_kernel_options"] = opts
            return rec
        except Exception as e:  # noqa: BLE001 - recorded in the JSON, next option tried
            errors.append(f"{opts}: {type(e).__name__}: {str(e)[:300]}")
            if rec.get("flex_fwd_kernel_options") != opts:  # keep the one the forward time came from
                _FLEX_FAILED.add((block_q, block_kv, str(opts)))
    rec["flex_error"] = errors or ["all kernel options failed at an earlier S"]
    return rec


def flex_coarse(q, k, v, do, s, density):
    """FlexAttention on a random 128x128 block mask of the same density (its supported block size):
    not the identical mask, a reference point for what Flex does where its backward compiles."""
    n = -(-s // 128)
    topk = max(1, round(density * n))
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.rand(1, H, n, n, device="cuda", generator=g).topk(topk, dim=-1).indices.sort(-1).values
    cnt = torch.full((1, H, n), topk, dtype=torch.int32, device="cuda")
    mask = flex_block_mask(ids.to(torch.int32), cnt, s, 128, 128)
    flex = flex_fn()

    def fwd(q_, k_, v_):
        return flex(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), block_mask=mask).transpose(1, 2)
    try:
        t_f, t_fb, _ = time_fwd_bwd(fwd, q, k, v, do)
        return {"flex128_fwd_ms": t_f, "flex128_fwdbwd_ms": t_fb, "flex128_density": topk / n}
    except Exception as e:  # noqa: BLE001
        return {"flex128_error": f"{type(e).__name__}: {str(e)[:300]}"}


def sparse_point(q, k, v, do, q_lr, k_lr, s, block_q, block_kv, density, with_flex, dense_out=None,
                 one_recompute=False, with_peers=False, graphed=False):
    n_kv = -(-s // block_kv)
    topk = max(1, round(density * n_kv))
    sel = lambda: select_blocks(q_lr, k_lr, topk, block_q=block_q, block_kv=block_kv, backend="triton")  # noqa: E731
    kv_idx, kv_cnt = sel()
    rec = dict(S=s, block_q=block_q, block_kv=block_kv, density=topk / n_kv, topk=topk)
    rec["select_ms"] = ms(sel)

    def fwd(q_, k_, v_):
        return block_sparse_attention(q_, k_, v_, kv_idx, kv_cnt, block_q=block_q, block_kv=block_kv,
                                      backend="triton")
    out = fwd(q, k, v)
    if dense_out is not None and topk == n_kv:
        rec["err_vs_cudnn"] = rel_err(out, dense_out)
    rec["fwd_ms"], rec["fwdbwd_ms"], rec["peak_bytes"] = time_fwd_bwd(fwd, q, k, v, do)
    rec["bwd_ms"] = rec["fwdbwd_ms"] - rec["fwd_ms"]
    rec["total_ms"] = rec["fwdbwd_ms"] + rec["select_ms"]
    if graphed:
        rec["select_graph_ms"] = graph_ms(sel)
        rec["fwd_graph_ms"] = graph_ms(lambda: fwd(q, k, v))
        rec["select_share_of_fwd_graph"] = rec["select_graph_ms"] / rec["fwd_graph_ms"]
    if one_recompute:  # the one-recompute backward (dq by atomics) on the same mask, and its gradients' gap
        def fwd1(q_, k_, v_):
            return block_sparse_attention(q_, k_, v_, kv_idx, kv_cnt, block_q=block_q, block_kv=block_kv,
                                          backend="triton-one-recompute")
        _, fb1, _ = time_fwd_bwd(fwd1, q, k, v, do)
        rec["one_recompute_bwd_ms"] = fb1 - rec["fwd_ms"]
        grads = []
        for fn in (fwd, fwd1):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            fn(*leaves).backward(do)
            grads.append([t.grad for t in leaves])
        rec["one_recompute_grad_rel_err"] = max(rel_err(a, b) for a, b in zip(*grads))
    f = fwd_flops(s, s, rec["density"])
    rec["fwd_tflops"] = tflops(f, rec["fwd_ms"])
    rec["bwd_tflops"] = tflops(2.5 * f, rec["bwd_ms"])
    rec["fwdbwd_tflops"] = tflops(3.5 * f, rec["fwdbwd_ms"])
    rec["index_bytes"] = kv_idx.numel() * 4 + kv_cnt.numel() * 4
    if with_peers and block_q == block_kv:  # the peers take square blocks
        import peers

        for peer in (peers.cudnn_bsa, peers.vsa):
            rec.update(peer(q, k, v, do, kv_idx, kv_cnt, block_q, out, time_fwd_bwd, rel_err))
        for name in ("cudnn_bsa", "vsa"):
            if f"{name}_fwdbwd_ms" in rec:
                rec[f"{name}_fwdbwd_tflops"] = tflops(3.5 * fwd_flops(s, s, rec["density"]), rec[f"{name}_fwdbwd_ms"])
                rec[f"speedup_fwdbwd_vs_{name}"] = rec[f"{name}_fwdbwd_ms"] / rec["fwdbwd_ms"]
        rec.update(auto_point(q, k, v, do, kv_idx, kv_cnt, block_q, block_kv))
        rec["auto_total_ms"] = rec["auto_fwdbwd_ms"] + rec["select_ms"]
    if with_flex:
        rec.update(run_flex(q, k, v, do, kv_idx, kv_cnt, s, block_q, block_kv, out))
        if "flex_fwdbwd_ms" in rec:
            rec["flex_fwdbwd_tflops"] = tflops(3.5 * f, rec["flex_fwdbwd_ms"])
        if block_kv == 64 and density <= 0.5:
            rec.update(flex_coarse(q, k, v, do, s, density))
    return rec


def auto_point(q, k, v, do, kv_idx, kv_cnt, block_q, block_kv):
    """backend="auto" where non-reproducible kernels are allowed (deterministic=False, a layer's default):
    the kernel it picks by timing the installed ones once at this shape (Triton's alone: untimed), and
    that kernel's forward + backward time."""
    from megatron_dsv.ops import backend_choice

    def fwd(q_, k_, v_):
        return block_sparse_attention(q_, k_, v_, kv_idx, kv_cnt, block_q=block_q, block_kv=block_kv,
                                      backend="auto", deterministic=False)
    backend_choice._CHOSEN.clear()
    fwd(q, k, v)   # the one-time choice
    chosen = next(iter(backend_choice._CHOSEN.values()), "triton")
    t_f, t_fb, _ = time_fwd_bwd(fwd, q, k, v, do)
    rec = {"auto_kernel": chosen, "auto_fwd_ms": t_f, "auto_fwdbwd_ms": t_fb}
    if chosen == "cudnn":   # the same kernel called directly right after: what the dispatch costs
        def direct(q_, k_, v_):
            return block_sparse_attention(q_, k_, v_, kv_idx, kv_cnt, block_q=block_q, block_kv=block_kv,
                                          backend="cudnn", deterministic=False)
        rec["auto_direct_fwdbwd_ms"] = time_fwd_bwd(direct, q, k, v, do)[1]
    return rec


def dense_point(q, k, v, do, s):
    rec = dict(S=s)
    outs = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            fn = sdpa(backend)
            outs[name] = fn(q, k, v)
            rec[f"{name}_fwd_ms"], rec[f"{name}_fwdbwd_ms"], rec[f"{name}_peak_bytes"] = time_fwd_bwd(fn, q, k, v, do)
            rec[f"{name}_fwdbwd_tflops"] = tflops(3.5 * fwd_flops(s, s, 1.0), rec[f"{name}_fwdbwd_ms"])
            rec[f"{name}_fwd_tflops"] = tflops(fwd_flops(s, s, 1.0), rec[f"{name}_fwd_ms"])
        except Exception as e:  # noqa: BLE001
            rec[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return rec, outs.get("cudnn")


def selection_breakdown(q_lr, k_lr, topk, block_q, block_kv, base, ms=ms):
    """Time the parts of select_blocks (with ms=graph_ms: each replayed from a CUDA graph): the block
    means of q_lr (the kernel, and the reference's torch formula), the score precisions, tilings and
    key spans (with the share of rows each picks as float32 FMAs do), and the top-k kernel at each
    warp count."""
    from megatron_dsv.ops import triton_selection as tsel
    from megatron_dsv.ops.reference import block_means_reference
    recs = []
    proxy = tsel._block_means(q_lr, block_q)
    recs.append(dict(base, kernel="sel_proxies", ms=ms(lambda: tsel._block_means(q_lr, block_q))))
    r = q_lr.shape[-1]
    for cols in sorted({max(16, r), 2 * r, 4 * r, 8 * r}):   # columns (heads x rank) per program
        for warps in (1, 2, 4):
            tsel.CONFIG_OVERRIDE.update(means_cols=cols, means_warps=warps)
            recs.append(dict(base, kernel=f"sel_proxies_c{cols}_w{warps}",
                             ms=ms(lambda: tsel._block_means(q_lr, block_q))))
    tsel.CONFIG_OVERRIDE.clear()

    def torch_means():
        return block_means_reference(q_lr.permute(0, 2, 1, 3), block_q)
    recs.append(dict(base, kernel="sel_proxies_torch", ms=ms(torch_means),
                     max_abs_diff=float((torch_means() - proxy).abs().max())))
    picks = {}
    variants = [("ieee", {}), ("tf32x3", {}), ("tf32", {})]
    if k_lr.dtype == torch.bfloat16:
        # spans: the keys cut into spans, one program each (short sequences: more programs than SMs).
        variants += [(f"bf16x3_qb{qb}_n{n}_w{w}_s{sp}", dict(score_qb=qb, score_block_n=n, score_warps=w,
                                                             score_spans=sp))
                     for qb in (32, 64, 128) for n in sorted({max(block_kv, 128), 256}) for w in (4, 8)
                     for sp in (1, 2, 4, 8)]
    for name, cfg in variants:
        tsel.CONFIG_OVERRIDE.clear()
        tsel.CONFIG_OVERRIDE.update(cfg, score_precision=name.split("_")[0])
        try:
            keys = tsel._score_keys_max(proxy, k_lr, block_kv, None, 0)
            recs.append(dict(base, kernel=f"sel_scores_{name}",
                             ms=ms(lambda: tsel._score_keys_max(proxy, k_lr, block_kv, None, 0))))
            picks[name] = select_blocks(q_lr, k_lr, topk, block_q=block_q, block_kv=block_kv, backend="triton")[0]
        except Exception as e:  # noqa: BLE001
            recs.append(dict(base, kernel=f"sel_scores_{name}", error=f"{type(e).__name__}: {str(e)[:200]}"))
    tsel.CONFIG_OVERRIDE.clear()
    keys = tsel._score_keys_max(proxy, k_lr, block_kv, None, 0)
    recs.append(dict(base, kernel="sel_topk", ms=ms(lambda: torch.topk(keys, topk, dim=-1))))
    # The per-row top-k into ascending ids: the threshold-search kernel at each warp count, and
    # torch.topk + sort (the path above TOP_BLOCKS_MAX_WIDTH).
    counts = torch.full((keys.shape[1], 1), topk, dtype=torch.int64, device=keys.device)
    n_kv = keys.shape[-1]
    for warps in (1, 2, 4, 8):
        tsel.CONFIG_OVERRIDE["top_blocks_warps"] = warps
        recs.append(dict(base, kernel=f"sel_top_blocks_w{warps}", ms=ms(lambda: tsel._top_blocks(keys, counts, topk, n_kv))))
    tsel.CONFIG_OVERRIDE.clear()
    width, tsel.TOP_BLOCKS_MAX_WIDTH = tsel.TOP_BLOCKS_MAX_WIDTH, 0
    recs.append(dict(base, kernel="sel_topk_and_sort", ms=ms(lambda: tsel._top_blocks(keys, counts, topk, n_kv))))
    tsel.TOP_BLOCKS_MAX_WIDTH = width
    recs.append(dict(base, kernel="sel_default", ms=ms(lambda: select_blocks(
        q_lr, k_lr, topk, block_q=block_q, block_kv=block_kv, backend="triton"))))
    for name, idx in picks.items():
        same = (idx == picks["ieee"]).all(-1).float().mean().item()
        recs.append(dict(base, kernel=f"sel_rows_equal_ieee_{name}", ms=0.0, value=same))
    for r in recs:
        print(json.dumps(r), flush=True)
    return recs


def tune(args, results):
    """Launch-config variants of each kernel at the target point, timed kernel by kernel."""
    s = args.tune_seq
    q, k, v, do, q_lr, k_lr = inputs(s)
    for block_q, block_kv in args.tune_blocks:
        n_kv = -(-s // block_kv)
        topk = max(1, round(args.tune_density * n_kv))
        kv_idx, kv_cnt = select_blocks(q_lr, k_lr, topk, block_q=block_q, block_kv=block_kv, backend="triton")
        f = fwd_flops(s, s, topk / n_kv)
        scale = D ** -0.5
        out, lse2 = ta._forward(q, k, v, kv_idx, kv_cnt, None, None, block_q, block_kv, scale, "bshd")
        dq, delta = ta._dq(do, q, k, v, out, lse2, None, kv_idx, kv_cnt, None, block_q, block_kv, scale, "bshd", False)
        q_idx, q_bounds = ta.transpose_block_lists(kv_idx, kv_cnt, n_kv)
        base = dict(S=s, block_q=block_q, block_kv=block_kv, density=topk / n_kv)
        t = ms(lambda: ta.transpose_block_lists(kv_idx, kv_cnt, n_kv))
        results.append(dict(base, kernel="transpose_lists", ms=t))
        bn = max(block_kv, 64)
        variants = {
            "fwd": [dict(BLOCK_N=bn, num_warps=w, num_stages=st, tma=t) for w in (4, 8) for st in (2, 3, 4)
                    for t in (False, True) if not (t and bn != block_kv) and (st < 4 or t)],
            "dq": [dict(BLOCK_N=n, num_warps=w, num_stages=st, tma=t) for n in sorted({bn, 128}) for w in (4, 8)
                   for st in (2, 3) for t in (False, True) if not (t and n != block_kv) and (st == 2 or t)],
            "dkdv": [dict(BLOCK_M=bm, num_warps=w, num_stages=st, tma=t, D_MAJOR=dm) for bm in (64, 128)
                     if bm <= block_q for w in (4, 8) for st in (2, 3) for t in (False, True) for dm in (False, True)
                     if not (bm == 128 and w == 4) and (t or st == 2)],
        }
        # Occupancy: one stage (no software pipelining) leaves shared memory for more programs per SM, whose
        # warps might hide each other's load latency; a register cap (maxnreg) lets registers allow them too.
        # --tune-occupancy times only these (the defaults among them).
        tiles = {"fwd": dict(BLOCK_N=bn), "dq": dict(BLOCK_N=bn), "dkdv": dict(BLOCK_M=64, D_MAJOR=False)}
        for kernel, tiled in tiles.items():
            occupancy = [dict(tiled, num_warps=4, num_stages=st, tma=True, **({"maxnreg": r} if r else {}))
                         for st in (1, 2) for r in (None, 128, 168)]
            variants[kernel] = occupancy if args.tune_occupancy else variants[kernel] + [
                c for c in occupancy if c not in variants[kernel]]
        # dq's adds as TMA bulk reductions (dq_tma), each dk/dv config; and the scalar atomics' best config.
        variants["dkdv_atomic"] = [dict(c, dq_tma=True) for c in variants["dkdv"]] + [
            dict(BLOCK_M=64, num_warps=4, num_stages=2, tma=False, D_MAJOR=True, dq_tma=False)]
        dq_acc = torch.zeros(delta.shape + (D,), dtype=torch.float32, device=q.device)
        calls = {
            "fwd": (lambda: ta._forward(q, k, v, kv_idx, kv_cnt, None, None, block_q, block_kv, scale, "bshd"), 1.0),
            "dq": (lambda: ta._dq(do, q, k, v, out, lse2, None, kv_idx, kv_cnt, None, block_q, block_kv, scale, "bshd",
                                  False), 1.5),
            "dkdv": (lambda: ta._dkdv(do, q, k, v, lse2, delta, q_idx, q_bounds, None, block_q, block_kv, scale, "bshd",
                                      False), 2.0),
            # dq's accumulator is not re-zeroed between repeats: the adds' cost does not depend on it.
            "dkdv_atomic": (lambda: ta._dkdv(do, q, k, v, lse2, delta, q_idx, q_bounds, None, block_q, block_kv, scale,
                                             "bshd", False, dq_acc=dq_acc), 2.5),
        }
        if "sel" in args.tune_kernels:
            results.extend(selection_breakdown(q_lr, k_lr, topk, block_q, block_kv, base,
                                               ms=graph_ms if args.graphed else ms))
        for kernel, cfgs in variants.items():
            if kernel not in args.tune_kernels:
                continue
            fn, flop_mult = calls[kernel]
            for cfg in cfgs:
                ta.CONFIG_OVERRIDE.clear()
                ta.CONFIG_OVERRIDE[kernel] = cfg
                rec = dict(base, kernel=kernel, cfg=cfg)
                try:
                    rec["ms"] = ms(fn, rep=200)
                    rec["tflops"] = tflops(flop_mult * f, rec["ms"])
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                results.append(rec)
                print(json.dumps(rec), flush=True)
        ta.CONFIG_OVERRIDE.clear()


# SASS opcodes that say how a kernel computes and moves data on Hopper: warpgroup MMA (HGMMA) vs
# per-warp MMA (HMMA), TMA loads (UTMALDG) vs async copies (LDGSTS) vs plain loads (LDG), and spills.
SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "LDGSTS", "LDG", "STG", "LDS", "STS", "LDL", "STL", "SHFL", "BAR", "MUFU")


def sass_opcode(line: str):
    """Opcode of one line of Triton's SASS listing ('--:-:-:Y:4<TAB>@!P0 HGMMA.64x64x16.F32.BF16 R24, ...;'
    -> 'HGMMA'); None for labels and headers."""
    if "\t" not in line or ";" not in line:
        return None
    words = line.split("\t", 1)[1].split(";")[0].split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else None


def compiled_kernels(jit_fn):
    """The CompiledKernels a @triton.jit function has built in this process (one per specialisation)."""
    for caches in jit_fn.device_caches.values():
        for cache in caches:
            if isinstance(cache, dict):
                yield from (k for k in cache.values() if hasattr(k, "n_regs"))


def constexpr_names(jit_fn, constants: dict) -> dict:
    """{(arg index,): value} of a specialisation -> {arg name: value}, integer and flag values only."""
    return {jit_fn.arg_names[key[0]]: v for key, v in constants.items() if isinstance(v, (int, bool))}


def resource_report():
    """Registers, spills, shared memory, launch config and SASS opcode counts of every kernel built so far."""
    rows = []
    for name, fn in (("fwd", ta._fwd_kernel), ("dq", ta._dq_kernel), ("dkdv", ta._dkdv_kernel),
                     ("select_scores", ts._block_score_keys_kernel)):
        for kern in compiled_kernels(fn):
            md = kern.metadata
            rec = dict(kernel=name, n_regs=kern.n_regs, n_spills=kern.n_spills, shared_bytes=md.shared,
                       num_warps=md.num_warps, num_stages=md.num_stages,
                       constexprs=constexpr_names(fn, getattr(kern.src, "constants", {})))
            try:
                ops = [sass_opcode(ln) for ln in kern.asm["sass"].splitlines()]
                rec["sass_ops"] = {op: ops.count(op) for op in SASS_OPS}
            except Exception as e:  # noqa: BLE001 - cuobjdump missing: registers still reported
                rec["sass_error"] = repr(e)[:200]
            rows.append(rec)
    return rows


def main():
    global H, D, RANK
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[16384, 65536, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5, 1.0])
    ap.add_argument("--block-kvs", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--block-q", type=int, default=128)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-seq", type=int, default=65536)
    ap.add_argument("--tune-density", type=float, default=0.1)
    ap.add_argument("--tune-blocks", type=lambda x: tuple(int(v) for v in x.split(",")), nargs="+",
                    default=[(128, 64), (64, 64), (128, 16)])
    ap.add_argument("--tune-kernels", nargs="+", default=["fwd", "dq", "dkdv", "sel"])
    ap.add_argument("--tune-occupancy", action="store_true",
                    help="time only one- and two-stage configs with and without a register cap (maxnreg)")
    ap.add_argument("--resources", action="store_true", help="report each kernel's registers, spills, "
                    "shared memory and SASS opcode counts after the sweep")
    ap.add_argument("--graphed", action="store_true",
                    help="also time selection and the sparse forward replayed from CUDA graphs (no host time); "
                    "with --tune, time the selection's parts so")
    ap.add_argument("--one-recompute", action="store_true",
                    help="also time the one-recompute backward (backend='triton-one-recompute') on each sparse point")
    ap.add_argument("--peers", action="store_true",
                    help="also time cuDNN frontend's block-sparse attention and VSA (fastvideo-kernel) on each "
                         "square-block sparse point's mask, where installed (bench/peers.py)")
    ap.add_argument("--heads", type=int, default=H)
    ap.add_argument("--head-dim", type=int, default=D)
    ap.add_argument("--rank", type=int, default=RANK, help="rank of the projections selection reads")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    H, D, RANK = args.heads, args.head_dim, args.rank

    dev = torch.cuda.get_device_name()
    meta = dict(device=dev, torch=torch.__version__, triton=__import__("triton").__version__,
                heads=H, head_dim=D, rank=RANK, dtype=str(DTYPE), argv=sys.argv[1:])
    dense, sparse, tuned, resources = [], [], [], []

    def save():  # after every point, so a run cut short still leaves its numbers
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(dict(meta=meta, dense=dense, sparse=sparse, tune=tuned,
                                                              resources=resources), indent=1))

    if args.tune:
        tune(args, tuned)
    else:
        for s in args.seqs:
            q, k, v, do, q_lr, k_lr = inputs(s)
            rec, dense_out = dense_point(q, k, v, do, s)
            dense.append(rec)
            print(json.dumps(rec), flush=True)
            for block_kv in args.block_kvs:
                for density in args.densities:
                    try:
                        r = sparse_point(q, k, v, do, q_lr, k_lr, s, args.block_q, block_kv, density,
                                         with_flex=not args.no_flex, dense_out=dense_out,
                                         one_recompute=args.one_recompute, with_peers=args.peers,
                                         graphed=args.graphed)
                    except Exception:  # noqa: BLE001 - recorded, the sweep goes on
                        r = dict(S=s, block_kv=block_kv, density=density, error=traceback.format_exc()[-800:])
                        print(r["error"], file=sys.stderr)
                    cud = rec.get("cudnn_fwdbwd_ms")
                    if cud and "total_ms" in r:
                        r["speedup_total_vs_cudnn"] = cud / r["total_ms"]
                        r["speedup_fwdbwd_vs_cudnn"] = cud / r["fwdbwd_ms"]
                    if "flex_fwdbwd_ms" in r and "fwdbwd_ms" in r:
                        r["speedup_fwdbwd_vs_flex"] = r["flex_fwdbwd_ms"] / r["fwdbwd_ms"]
                    if "flex128_fwdbwd_ms" in r and "fwdbwd_ms" in r:
                        r["speedup_fwdbwd_vs_flex128"] = r["flex128_fwdbwd_ms"] / r["fwdbwd_ms"]
                    sparse.append(r)
                    save()
                    print(json.dumps(r), flush=True)
            del q, k, v, do, q_lr, k_lr, dense_out
            torch.cuda.empty_cache()
    if args.resources:
        resources.extend(resource_report())
    save()

    print(f"\ndevice: {dev}  (bf16, {H} heads, d {D}, block_q {args.block_q})")
    if tuned:
        best = {}
        for r in tuned:
            key = (r["block_q"], r["block_kv"], r["kernel"])
            if "ms" in r and (key not in best or r["ms"] < best[key]["ms"]):
                best[key] = r
        print(f"{'bq':>4} {'bkv':>4} {'kernel':>26} {'ms':>8} {'TF/s':>6}  cfg")
        for (bq, bkv, kern), r in sorted(best.items()):
            print(f"{bq:>4} {bkv:>4} {kern:>26} {r['ms']:8.3f} {r.get('tflops') or 0:6.0f}  {r.get('cfg', '')}"
                  f"{r.get('value', '')}")
        return
    if resources:
        print(f"{'kernel':>13} {'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} {'smem KB':>7}  SASS opcode counts")
        for r in resources:
            ops = " ".join(f"{k}:{v}" for k, v in r.get("sass_ops", {}).items() if v) or r.get("sass_error", "")
            print(f"{r['kernel']:>13} {r['num_warps']:>5} {r['num_stages']:>6} {r['n_regs']:>4} {r['n_spills']:>5} "
                  f"{r['shared_bytes'] / 1024:7.1f}  {ops}")
    for rec in dense:
        print(f"S={rec['S']}: cuDNN fwd {rec.get('cudnn_fwd_ms', float('nan')):.2f} ms, fwd+bwd "
              f"{rec.get('cudnn_fwdbwd_ms', float('nan')):.2f} ms ({rec.get('cudnn_fwdbwd_tflops') or 0:.0f} TF/s); "
              f"flash fwd+bwd {rec.get('flash_fwdbwd_ms', float('nan')):.2f} ms")
    hdr = (f"{'S':>7} {'bkv':>4} {'dens':>5} {'sel':>6} {'fwd':>7} {'bwd':>7} {'total':>7} {'fbTF':>5} "
           f"{'xcuDNN':>6} {'flexF':>7} {'flexFB':>7} {'f128FB':>7}")
    print(hdr)
    for r in sparse:
        if "total_ms" not in r:
            print(f"{r['S']:>7} {r['block_kv']:>4} {r['density']:5.2f}  ERROR")
            continue
        print(f"{r['S']:>7} {r['block_kv']:>4} {r['density']:5.3f} {r['select_ms']:6.2f} {r['fwd_ms']:7.2f} "
              f"{r['bwd_ms']:7.2f} {r['total_ms']:7.2f} {r['fwdbwd_tflops']:5.0f} "
              f"{r.get('speedup_total_vs_cudnn', 0):6.2f} {r.get('flex_fwd_ms', float('nan')):7.2f} "
              f"{r.get('flex_fwdbwd_ms', float('nan')):7.2f} {r.get('flex128_fwdbwd_ms', float('nan')):7.2f}"
              + (f" bwd1R {r['one_recompute_bwd_ms']:.2f} (err {r['one_recompute_grad_rel_err']:.1e})"
                 if "one_recompute_bwd_ms" in r else ""))
    if args.graphed:
        print("\nreplayed from CUDA graphs (no host time): selection, sparse forward, selection / forward")
        for r in sparse:
            if "select_graph_ms" in r:
                print(f"{r['S']:>7} {r['block_kv']:>4} {r['density']:5.3f} {r['select_graph_ms']:7.3f} "
                      f"{r['fwd_graph_ms']:7.3f} {r['select_share_of_fwd_graph']:6.2f}")
    if args.peers:
        print("\nbackend='auto', deterministic=False (times the installed kernels once per shape), with selection")
        for r in sparse:
            if "auto_total_ms" in r:
                dense_ms = next(d["cudnn_fwdbwd_ms"] for d in dense if d["S"] == r["S"])
                print(f"{r['S']:>7} {r['block_kv']:>4} {r['density']:5.3f} {r['auto_kernel']:>20} "
                      f"{r['auto_total_ms']:7.2f} ms  x cuDNN dense {dense_ms / r['auto_total_ms']:5.2f}  "
                      f"x Flex128 {r.get('flex128_fwdbwd_ms', float('nan')) / r['auto_total_ms']:5.2f}  "
                      f"(the kernel called directly after it: {r.get('auto_direct_fwdbwd_ms', float('nan')):.2f} ms)")
        print("\npeers on the same masks, fwd+bwd ms (x = peer time / ours; ours without selection)")
        print(f"{'S':>7} {'blk':>4} {'dens':>5} {'ours':>7} {'cuDNN-BSA':>9} {'x':>5} {'VSA':>7} {'x':>5}  VSA path")
        for r in sparse:
            if "fwdbwd_ms" not in r or r["block_q"] != r["block_kv"]:
                continue
            print(f"{r['S']:>7} {r['block_kv']:>4} {r['density']:5.3f} {r['fwdbwd_ms']:7.2f} "
                  f"{r.get('cudnn_bsa_fwdbwd_ms', float('nan')):9.2f} {r.get('speedup_fwdbwd_vs_cudnn_bsa', 0):5.2f} "
                  f"{r.get('vsa_fwdbwd_ms', float('nan')):7.2f} {r.get('speedup_fwdbwd_vs_vsa', 0):5.2f}  "
                  f"{r.get('vsa_path', r.get('vsa_error', ''))[:60]}"
                  + (f" cuDNN: {r['cudnn_bsa_error'][:80]}" if "cudnn_bsa_error" in r else ""))


if __name__ == "__main__":
    main()
