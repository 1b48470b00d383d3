"""How often backend="auto" keeps the kernel that a long timing finds faster.

For each (S, density) it selects one mask (select_blocks, rank-R projections), times forward + backward
of our Triton kernels and of cuDNN frontend's block-sparse kernels with bench/kernels.py's long timing
(triton.testing.do_bench) in --abba-rounds rounds of A B B A order (medians: the same kernel timed minutes
apart in one process drifted by up to 7% on an H200, so a fixed order favours one side), then makes the
auto choice afresh --repeats times in each form of --forms:
  rounds   the default (ops/backend_choice.py): ROUNDS interleaved rounds of CALLS_PER_ROUND calls, median
  block    one round of five calls per kernel, after every kernel's warm-ups (the count and statistic of the
           form before; that form ran each kernel's three warm-ups right before its own five calls)
and counts the picks that agree with the long timing. Needs cuDNN frontend's block-sparse attention.

    python bench/auto_choice.py --seqs 65536 131072 --densities 0.1 0.05 --repeats 6 --json out.json
    python bench/auto_choice.py --forms rounds --repeats 4 --abba-rounds 4

Prints a table last; writes JSON with the device name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kb  # noqa: E402  (bench/kernels.py: inputs and long timing)
from megatron_dsv.ops import backend_choice  # noqa: E402
from megatron_dsv.ops.block_sparse import block_sparse_attention  # noqa: E402
from megatron_dsv.ops.selection import select_blocks  # noqa: E402

FORMS = {"rounds": (backend_choice.ROUNDS, backend_choice.CALLS_PER_ROUND), "block": (1, 5)}


def abba_ms(fns, rounds):
    """Median forward + backward ms of each of two steps, timed in rounds of A B B A order."""
    times = {name: [] for name in fns}
    a, b = fns
    for _ in range(rounds):
        for name in (a, b, b, a):
            times[name].append(kb.ms(fns[name]))
    return {name: statistics.median(t) for name, t in times.items()}, times


def point(s, density, repeats, forms, abba_rounds, notices):
    q, k, v, do, q_lr, k_lr = kb.inputs(s)
    n_kv = s // 64
    idx, cnt = select_blocks(q_lr, k_lr, max(1, round(density * n_kv)), block_q=64, block_kv=64, backend="triton")

    def call(backend):
        return lambda q_, k_, v_: block_sparse_attention(q_, k_, v_, idx, cnt, block_q=64, block_kv=64,
                                                         backend=backend, deterministic=False)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def step(fwd):
        return lambda: torch.autograd.grad(fwd(qg, kg, vg), (qg, kg, vg), do)
    long, rounds_ms = abba_ms({name: step(call(name)) for name in ("triton", "cudnn")}, abba_rounds)
    faster = min(long, key=long.get)
    rec = dict(S=s, density=density, long_ms=long, long_rounds_ms=rounds_ms, faster=faster,
               triton_over_cudnn=long["triton"] / long["cudnn"])
    auto = call("auto")
    try:
        for form in forms:
            backend_choice.ROUNDS, backend_choice.CALLS_PER_ROUND = FORMS[form]
            picks, timed = [], []
            for _ in range(repeats):
                backend_choice._CHOSEN.clear()
                del notices[:]
                torch.autograd.grad(auto(qg, kg, vg), (qg, kg, vg), do)
                if not backend_choice._CHOSEN:
                    raise SystemExit(f"auto made no choice at S={s}, density {density}: {notices}")
                picks.append(next(iter(backend_choice._CHOSEN.values())))
                timed.append(next((n for n in notices if " -> " in n), ""))
            rec[form] = dict(picks=picks, agree=sum(p == faster for p in picks), notices=timed)
    finally:
        backend_choice.ROUNDS, backend_choice.CALLS_PER_ROUND = FORMS["rounds"]
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS))
    ap.add_argument("--abba-rounds", type=int, default=2)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    kb.RANK = args.rank
    notices = []
    backend_choice.notice = notices.append   # each choice's timings, kept per repeat
    recs = []
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rank=args.rank, heads=kb.H,
                head_dim=kb.D, argv=sys.argv[1:])
    for s in args.seqs:
        for density in args.densities:
            recs.append(point(s, density, args.repeats, args.forms, args.abba_rounds, notices))
            print(json.dumps(recs[-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(dict(meta=meta, points=recs), indent=1))
    print(f"\n{meta['device']}: forward + backward, medians of {args.abba_rounds} A B B A rounds; picks agreeing "
          f"with them, of {args.repeats}")
    print("| S | density | Triton ms | cuDNN ms | cuDNN / Triton time | faster | " + " | ".join(args.forms) + " |")
    print("|---" * (6 + len(args.forms)) + "|")
    for r in recs:
        print(f"| {r['S']} | {r['density']} | {r['long_ms']['triton']:.2f} | {r['long_ms']['cudnn']:.2f} | "
              f"{1 / r['triton_over_cudnn']:.3f} | {r['faster']} | "
              + " | ".join(str(r[f]['agree']) for f in args.forms) + " |")


if __name__ == "__main__":
    main()
