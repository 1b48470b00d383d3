"""Packed-clip benchmark: DSV on several clips packed into one sequence vs one clip, and vs dense.

For each packing of ~64k tokens (16 heads, d 128, bf16, every clip at the same density) it times,
in one process on one GPU:
  DSV: selection + block-sparse forward + backward with `segments` (each clip on a 64-token
       boundary; per-clip budgets k = ceil(density x clip KV blocks));
  dense: cuDNN SDPA forward + backward on the same packing, one call per clip (what
       `dense_attention(segments=...)` runs), and torch's varlen attention (Flash Attention, one
       call for the packing) where this torch has it; the speedup is over the faster of the two
       (Transformer Engine's THD kernel is not on the image);
  the layer's alignment copy in forward (q, k, v in, out back), for packers that do not align clips.
Effective TFLOP/s count computed blocks only (4*h*d*block_q*block_kv per selected block pair,
x3.5 for forward+backward), so packed and single-clip rates are comparable although a packing
does less work than one clip of the same length. Also checks each packed clip against the
same clip run alone.

    python bench/packed.py --json bench/results/packed_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import D, DTYPE, H, RANK, ms, rel_err, tflops  # noqa: E402
from megatron_dsv.layers.packing import BlockAlignedPacking  # noqa: E402
from megatron_dsv.ops import Segments, block_sparse_attention, dense_attention, select_blocks  # noqa: E402

BLOCK_Q, BLOCK_KV = 128, 64  # the kernel issue's headline point
# Latent grids (T, H, W); lengths are not multiples of 64, so clips are padded to a block boundary.
PACKINGS = {
    "single clip (16x64x64)": [(16, 64, 64)],
    "4 mixed clips": [(13, 30, 52), (9, 44, 44), (21, 24, 40), (5, 30, 50)],
    "16 clips of 4k": [(4, 32, 32)] * 16,
    "9 mixed clips": [(8, 30, 40), (4, 20, 36), (16, 24, 24), (3, 40, 40), (6, 30, 30), (2, 50, 60),
                      (12, 16, 20), (1, 60, 64), (5, 28, 28)],
}


def run(name, grids, density, args):
    lengths = [math.prod(g) for g in grids]
    seg = Segments(lengths, align=BLOCK_Q)
    s = seg.total
    g = torch.Generator(device="cuda").manual_seed(0)
    valid = seg.token_valid("cuda").view(1, -1, 1, 1)
    q, k, v, do = (torch.randn(1, s, H, D, device="cuda", dtype=DTYPE, generator=g) * valid for _ in range(4))
    q_lr, k_lr = (torch.randn(1, s, H, RANK, device="cuda", dtype=DTYPE, generator=g) * valid for _ in range(2))
    per_clip = seg.blocks_per_clip(BLOCK_KV)
    budgets = torch.tensor([[math.ceil(density * n) for n in per_clip]] * H)
    kw = dict(block_q=BLOCK_Q, block_kv=BLOCK_KV, segments=seg)

    def select():
        return select_blocks(q_lr, k_lr, budgets, backend="triton", **kw)

    kv_idx, kv_cnt = select()
    pairs = int(kv_cnt.sum())
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def sparse_step():
        out = block_sparse_attention(qg, kg, vg, kv_idx, kv_cnt, backend="triton", **kw)
        torch.autograd.grad(out, (qg, kg, vg), do)

    def dense_step():
        out = dense_attention(qg, kg, vg, segments=seg)
        torch.autograd.grad(out, (qg, kg, vg), do)

    t_varlen = _varlen_ms(lengths, seg, q, k, v, do)

    t_sel = ms(select)
    t_fwd = ms(lambda: block_sparse_attention(q, k, v, kv_idx, kv_cnt, backend="triton", **kw))
    t_fb = ms(sparse_step)
    t_cudnn = ms(dense_step, rep=100)
    t_dense = min(t_cudnn, t_varlen or math.inf)
    # The layer's copy into the aligned layout (q, k, v in; out back) when the packer did not align.
    unaligned = BlockAlignedPacking(Segments(lengths), BLOCK_Q)
    x = torch.randn(sum(lengths), 1, H, D, device="cuda", dtype=DTYPE)
    y = unaligned.to_blocks(x)
    t_copy = ms(lambda: ([unaligned.to_blocks(x) for _ in range(3)], unaligned.from_blocks(y)))

    # The same clips one at a time, each its own sequence: selection + forward + backward. Each packed
    # clip's output must equal its output alone.
    out = block_sparse_attention(q, k, v, kv_idx, kv_cnt, backend="triton", **kw)
    t_alone, err = 0.0, 0.0
    for c, n in enumerate(lengths):
        sl = slice(seg.starts[c], seg.starts[c] + n)
        qc, kc, vc, doc = (t[:, sl].contiguous() for t in (q, k, v, do))
        lr = [t[:, sl].contiguous() for t in (q_lr, k_lr)]
        topk = budgets[:, c]
        idx, cnt = select_blocks(*lr, topk, block_q=BLOCK_Q, block_kv=BLOCK_KV, backend="triton")
        err = max(err, rel_err(out[:, sl], block_sparse_attention(qc, kc, vc, idx, cnt, block_q=BLOCK_Q,
                                                                  block_kv=BLOCK_KV, backend="triton")))
        leaves = [t.detach().requires_grad_() for t in (qc, kc, vc)]

        def alone_step():
            i, j = select_blocks(*lr, topk, block_q=BLOCK_Q, block_kv=BLOCK_KV, backend="triton")
            o = block_sparse_attention(*leaves, i, j, block_q=BLOCK_Q, block_kv=BLOCK_KV, backend="triton")
            torch.autograd.grad(o, leaves, doc)

        t_alone += ms(alone_step, rep=100)

    flops = 4.0 * D * BLOCK_Q * BLOCK_KV * pairs  # pairs sums over heads
    dense_flops = sum(4.0 * H * n * n * D for n in lengths)
    total = t_sel + t_fb
    return dict(packing=name, grids=grids, clips=len(lengths), tokens=sum(lengths), padded_tokens=s,
                density=density, selected_pairs=pairs, sel_ms=t_sel, fwd_ms=t_fwd, fwd_bwd_ms=t_fb,
                total_ms=total, clips_alone_total_ms=t_alone, dense_cudnn_per_clip_ms=t_cudnn,
                dense_varlen_ms=t_varlen, dense_fwd_bwd_ms=t_dense, speedup_vs_dense=t_dense / total,
                fwd_bwd_tflops=tflops(flops * 3.5, t_fb), dense_tflops=tflops(dense_flops * 3.5, t_dense),
                layer_copy_ms=t_copy, clip_alone_rel_err=err)


def _varlen_ms(lengths, seg, q, k, v, do):
    """Forward + backward of torch's varlen attention on the clips' tokens (padding dropped, one call),
    or None where this torch has no varlen attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    q_t, k_t, v_t, do_t = (seg.gather(t[0]).detach() for t in (q, k, v, do))  # [tokens, h, d]
    leaves = [t.requires_grad_() for t in (q_t, k_t, v_t)]
    cu = torch.tensor([0] + lengths, device=q.device).cumsum(0).int()

    def step():
        out = varlen_attn(*leaves, cu, cu, max(lengths), max(lengths))
        torch.autograd.grad(out, leaves, do_t)

    return ms(step, rep=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [run(name, grids, args.density, args) for name, grids in PACKINGS.items()]
    single = rows[0]
    for r in rows:
        r["rate_vs_single_clip"] = r["fwd_bwd_tflops"] / single["fwd_bwd_tflops"]
        r["speedup_vs_single_clip_speedup"] = r["speedup_vs_dense"] / single["speedup_vs_dense"]
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, heads=H, head_dim=D, dtype=str(DTYPE),
                  block_q=BLOCK_Q, block_kv=BLOCK_KV, results=rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}, {H} heads, d {D}, bf16, density {args.density}, blocks {BLOCK_Q}x{BLOCK_KV}; "
          "total = selection + fwd + bwd; 'alone' = the same clips one sequence at a time; speedup over the "
          "faster dense (cuDNN per clip, torch varlen)")
    print(f"{'packing':24s} {'tokens':>7s} {'sel ms':>7s} {'f+b ms':>7s} {'total':>7s} {'alone':>7s} {'TFLOP/s':>8s} "
          f"{'rate/1clip':>10s} {'cuDNN ms':>9s} {'varlen ms':>9s} {'speedup':>8s} {'sp/1clip':>8s} {'copy ms':>8s} "
          f"{'err':>8s}")
    for r in rows:
        print(f"{r['packing']:24s} {r['tokens']:7d} {r['sel_ms']:7.2f} {r['fwd_bwd_ms']:7.2f} {r['total_ms']:7.2f} "
              f"{r['clips_alone_total_ms']:7.2f} {r['fwd_bwd_tflops']:8.0f} {r['rate_vs_single_clip']:10.2f} "
              f"{r['dense_cudnn_per_clip_ms']:9.2f} {r['dense_varlen_ms'] or float('nan'):9.2f} "
              f"{r['speedup_vs_dense']:7.2f}x {r['speedup_vs_single_clip_speedup']:8.2f} "
              f"{r['layer_copy_ms']:8.2f} {r['clip_alone_rel_err']:8.1e}")


if __name__ == "__main__":
    main()
