"""A/B of the dq and dk/dv kernels' pipeline stages (2 against 3) at block 64x64, density 0.1.

    python bench/stages_ab.py --json bench/results/kernels_stages_ab_h200.json

bench/kernels.py --tune times each launch config once; this alternates the two arms over rounds, so
a drift of the machine falls on both (bench/NOTES_kernels.md). Single-pass kernel calls (no L2-sized
passes at 128k), selection from random rank-16 projections, 16 heads x 128, bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import kernels as kb
from megatron_dsv.ops import triton_attention as ta
from megatron_dsv.ops.selection import select_blocks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "rows": []}
    bq = bkv = 64
    scale = kb.D ** -0.5
    for s in args.seqs:
        q, k, v, do, q_lr, k_lr = kb.inputs(s)
        n_kv = s // bkv
        kv_idx, kv_cnt = select_blocks(q_lr, k_lr, round(0.1 * n_kv), block_q=bq, block_kv=bkv, backend="triton")
        o, lse2 = ta._forward(q, k, v, kv_idx, kv_cnt, None, None, bq, bkv, scale, "bshd")
        _, delta = ta._dq(do, q, k, v, o, lse2, None, kv_idx, kv_cnt, None, bq, bkv, scale, "bshd", False)
        q_idx, q_bounds = ta.transpose_block_lists(kv_idx, kv_cnt, n_kv)
        calls = {"dq": lambda: ta._dq(do, q, k, v, o, lse2, None, kv_idx, kv_cnt, None, bq, bkv, scale, "bshd", False),
                 "dkdv": lambda: ta._dkdv(do, q, k, v, lse2, delta, q_idx, q_bounds, None, bq, bkv, scale, "bshd",
                                          False)}
        for kern, fn in calls.items():
            times = {2: [], 3: []}
            for _ in range(args.rounds):
                for stages in times:
                    ta.CONFIG_OVERRIDE.clear()
                    ta.CONFIG_OVERRIDE[kern] = {"num_stages": stages}
                    times[stages].append(kb.ms(fn, rep=150))
            ta.CONFIG_OVERRIDE.clear()
            out["rows"].append({"S": s, "kernel": kern, **{f"stages{st}": t for st, t in times.items()}})
            print(s, kern, "3 stages / 2 stages, medians: %.3f" % (statistics.median(times[3]) /
                                                                   statistics.median(times[2])), flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
