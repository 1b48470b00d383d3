"""Does the sparse kernels' speed fall with the KV footprint one head's programs read (L2 misses)?

Same work, different footprint: every query block of every head attends k = density * n_kv KV
blocks drawn at random (ascending, as selection writes them) from
  all      the whole sequence (what bench/kernels.py measures);
  half     only the first half of the KV blocks (half the K/V bytes per head);
  quarter  only the first quarter;
and split2: the whole-sequence work done as two calls, each over one half of the KV blocks with
k / 2 blocks per query block (the cost of running the KV range in two L2-sized passes, without
merging the two partial outputs). One head's K and V take S * d * 2 bytes * 2 (64 MB at 128k,
d 128, bf16) against the H200's 60 MiB of L2 (as torch reports it): if the forward is bound by L2 misses, 'half' and
'split2' run faster per block than 'all' at 128k and not at 64k. These arms run the kernels in one
pass over the span. The last arm, 'all, passes', is the 'all' mask as the kernels run it by
default: in as many passes as the span needs to fit L2 (triton_attention.L2_SHARE).

    python bench/l2_footprint.py --json bench/results/l2_footprint_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_dsv.ops import triton_attention as ta  # noqa: E402
from megatron_dsv.ops.block_sparse import block_sparse_attention  # noqa: E402

H, D, BLOCK = 16, 128, 64


def random_mask(n_q, lo, hi, k, gen):
    """[1, H, n_q, k] ascending random block ids from [lo, hi), and counts k."""
    keys = torch.rand(1, H, n_q, hi - lo, device="cuda", generator=gen)
    idx = keys.topk(k, dim=-1).indices.sort(dim=-1).values + lo
    return idx.int(), torch.full((1, H, n_q), k, dtype=torch.int32, device="cuda")


def timings(q, k, v, do, masks, passes):
    """(forward ms, forward + backward ms) of running every mask in `masks` one after the other, in one
    pass over the span or (passes=True) as many as the kernels choose."""
    ta.CONFIG_OVERRIDE.clear()
    if not passes:
        ta.CONFIG_OVERRIDE["pass_bytes"] = 1 << 62
    def fwd():
        return [block_sparse_attention(q, k, v, i, c, block_q=BLOCK, block_kv=BLOCK, backend="triton") for i, c in masks]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def fwd_bwd():
        outs = [block_sparse_attention(*leaves, i, c, block_q=BLOCK, block_kv=BLOCK, backend="triton")
                for i, c in masks]
        torch.autograd.grad(outs, leaves, [do] * len(outs))
    times = (do_bench(fwd, warmup=3, rep=600, return_mode="median"),
             do_bench(fwd_bwd, warmup=3, rep=1500, return_mode="median"))
    ta.CONFIG_OVERRIDE.clear()
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[65536, 131072, 262144])
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--once", action="store_true", help="run each arm's forward once, untimed (under ncu)")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for s in args.seqs:
        q, k, v, do = (torch.randn(1, s, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
        n = s // BLOCK
        topk = round(args.density * n)
        arms = {
            "all": [random_mask(n, 0, n, topk, gen)],
            "half": [random_mask(n, 0, n // 2, topk, gen)],
            "quarter": [random_mask(n, 0, n // 4, topk, gen)],
            "split2": [random_mask(n, 0, n // 2, topk // 2, gen), random_mask(n, n // 2, n, topk - topk // 2, gen)],
        }
        arms["all, passes"] = arms["all"]
        for name, masks in arms.items():
            if args.once:
                for i, c in masks:
                    block_sparse_attention(q, k, v, i, c, block_q=BLOCK, block_kv=BLOCK, backend="triton")
                torch.cuda.synchronize()
                continue
            passes = name == "all, passes"
            f, fb = timings(q, k, v, do, masks, passes)
            rows.append(dict(S=s, arm=name, topk=topk, kv_bytes_per_head=2 * s * D * 2, fwd_ms=f, fwdbwd_ms=fb,
                             bwd_ms=fb - f,
                             passes=ta._passes(n, BLOCK, D, 2, q.device) if passes else 1))
            print(rows[-1], flush=True)
        del q, k, v, do, arms
        torch.cuda.empty_cache()
    if args.once:
        return
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "l2_bytes": torch.cuda.get_device_properties(0).L2_cache_size,
                                               "heads": H, "head_dim": D, "block": BLOCK, "density": args.density,
                                               "results": rows}, indent=1))
    print(f"\n{torch.cuda.get_device_name()}; {H} heads x {D}, bf16, blocks {BLOCK}x{BLOCK}, density {args.density}")
    print(f"{'S':>7} {'arm':>12} {'passes':>6} {'fwd ms':>8} {'bwd ms':>8} {'fwd x all':>9} {'bwd x all':>9} "
          f"{'f+b x all':>9}")
    for r in rows:
        base = next(x for x in rows if x["S"] == r["S"] and x["arm"] == "all")
        print(f"{r['S']:>7} {r['arm']:>12} {r['passes']:>6} {r['fwd_ms']:>8.2f} {r['bwd_ms']:>8.2f} "
              f"{base['fwd_ms'] / r['fwd_ms']:>9.2f} {base['bwd_ms'] / r['bwd_ms']:>9.2f} "
              f"{base['fwdbwd_ms'] / r['fwdbwd_ms']:>9.2f}")


if __name__ == "__main__":
    main()
