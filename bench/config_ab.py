"""A/B of a launch-config change of the forward, dq or dk/dv kernel (arm B) against its default (arm A), at
block 64x64, density 0.1.

    python bench/config_ab.py --b '{"num_stages": 3}' --json bench/results/kernels_stages_ab_h200.json

bench/kernels.py --tune times each launch config once; this alternates the two arms over rounds, so
a drift of the machine falls on both (bench/NOTES_kernels.md). Single-pass kernel calls (no L2-sized
passes at 128k), the arms in ABBA order, selection from random rank-16 projections, 16 heads x 128, bf16.
(Named stages_ab.py while it compared pipeline stages only; until 2026-12-01 it timed arm A first in every
round and let dq run its two L2-sized passes at 128k.)
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import kernels as kb
from megatron_dsv.ops import triton_attention as ta
from megatron_dsv.ops.selection import select_blocks


SINGLE_PASS = 1 << 62   # CONFIG_OVERRIDE["pass_bytes"]: no L2-sized passes (dq would take two at 128k)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--kernels", nargs="+", default=["dq", "dkdv"], choices=["fwd", "dq", "dkdv"])
    ap.add_argument("--b", type=json.loads, required=True, help="arm B's config entries, as JSON")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "b": args.b, "rows": []}
    bq = bkv = 64
    scale = kb.D ** -0.5
    for s in args.seqs:
        q, k, v, do, q_lr, k_lr = kb.inputs(s)
        n_kv = s // bkv
        kv_idx, kv_cnt = select_blocks(q_lr, k_lr, round(0.1 * n_kv), block_q=bq, block_kv=bkv, backend="triton")
        o, lse2 = ta._forward(q, k, v, kv_idx, kv_cnt, None, None, bq, bkv, scale, "bshd")
        _, delta = ta._dq(do, q, k, v, o, lse2, None, kv_idx, kv_cnt, None, bq, bkv, scale, "bshd", False)
        q_idx, q_bounds = ta.transpose_block_lists(kv_idx, kv_cnt, n_kv)
        calls = {"fwd": lambda: ta._forward(q, k, v, kv_idx, kv_cnt, None, None, bq, bkv, scale, "bshd"),
                 "dq": lambda: ta._dq(do, q, k, v, o, lse2, None, kv_idx, kv_cnt, None, bq, bkv, scale, "bshd", False),
                 "dkdv": lambda: ta._dkdv(do, q, k, v, lse2, delta, q_idx, q_bounds, None, bq, bkv, scale, "bshd",
                                          False)}
        for kern in args.kernels:
            times = {"a": [], "b": []}
            for r in range(args.rounds):
                for arm in ("a", "b") if r % 2 == 0 else ("b", "a"):   # ABBA: neither arm is always timed first
                    ta.CONFIG_OVERRIDE.clear()
                    ta.CONFIG_OVERRIDE.update({kern: args.b if arm == "b" else {}, "pass_bytes": SINGLE_PASS})
                    times[arm].append(kb.ms(calls[kern], rep=150))
            ta.CONFIG_OVERRIDE.clear()
            out["rows"].append({"S": s, "kernel": kern, **times})
            print(s, kern, "B / A, medians: %.3f (A %.3f ms)" % (statistics.median(times["b"]) /
                  statistics.median(times["a"]), statistics.median(times["a"])), flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
