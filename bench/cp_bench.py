"""Hybrid context parallelism on real GPUs: every plan measured, the planner's choice and predictions checked.

One attention layer (forward + backward, bf16, per-head budgets from 2% to 30% of the KV blocks, random
inputs and predictor weights) on P GPUs (torchrun, any P), per sequence length:

  one GPU          DSV (selection + block-sparse attention) on the whole sequence, rank 0 alone
  dense ulysses    dense_cp_attention, U = P (head all-to-all; P <= heads)
  dense ring       dense_cp_attention, U = 1 (K/V all-gather over the sequence ranks)
  dsv U=.. <a> <s> dsv_cp_attention with fixed_plan(U, assignment a in naive/lpt/capped/split, schedule s),
                   for every U dividing P (U <= heads); U = 1 is the pure sequence split
  planner          plan() with the default CostModel, and with the cost model measured on these GPUs
                   (megatron_dsv.cp.calibration.measure_cost_model); and the layer's default on CUDA
                   (cp_plan_search='auto'): the model's best plan of each (U, schedule) timed, the fastest kept

Times are the median over --iters of the slowest rank. Each DSV row also gives its forward phases from
CUDA events (head all-to-all, selection, K-lowrank gather, KV exchange, attention; backward all-to-all,
attention and exchange; megatron_dsv.cp phases, slowest rank; where a plan has R = 1 the attention is the
block-sparse op itself and its backward is not a phase of its own) and the time the planner's cost model predicts for that
plan, default and calibrated (the calibrated model's kv_union is measured on this run's selection). The links (all-to-all, ring point-to-point bandwidth, latency) and kernel
rates of the calibration are in the JSON.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 bench/cp_bench.py --tokens 65536 131072 \\
        --json bench/results/cp_bench_h200x2.json
    torchrun --nproc-per-node 2 bench/cp_bench.py --smoke     # CPU, gloo, reference kernels: checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")      # NVLink multicast off (the lent machines require it)
os.environ.setdefault("NCCL_NVLS_ENABLED", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dsv.cp import (CostModel, HybridCPGroup, Shape, candidate_plans, dense_cp_attention,  # noqa: E402
                             dsv_cp_attention, estimate, fastest_plan, fixed_plan, plan)
from megatron_dsv.cp.calibration import kv_union, measure_cost_model, slowest, time_ms  # noqa: E402
from megatron_dsv.cp.planner import densities as to_densities, head_compute_s  # noqa: E402
from megatron_dsv.timing import ForwardTimer  # noqa: E402
from megatron_dsv.ops import block_sparse_attention, select_blocks  # noqa: E402


def head_budgets(heads: int, lo: float, hi: float, seed: int):
    """Per-head densities from lo to hi (quadratic spacing, mean ~ lo + (hi - lo) / 3), in a seeded random head
    order, so that naive head order is as unbalanced as a trained model's tends to be."""
    x = torch.linspace(0, 1, heads, dtype=torch.float64) ** 2 * (hi - lo) + lo
    perm = torch.randperm(heads, generator=torch.Generator().manual_seed(seed))
    return [float(v) for v in x[perm]]


class Layer:
    """One sequence length: the whole sequence's q, k, v (same on every rank) and this rank's shard."""

    def __init__(self, args, S, group, device, dtype):
        self.S, self.group, self.device, self.dtype = S, group, device, dtype
        H, d, r = args.heads, args.head_dim, args.rank
        gen = torch.Generator(device=device).manual_seed(1234 + S)
        mk = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
        self.q, self.k, self.v, self.do = (mk(S, 1, H, d) for _ in range(4))
        self.wq, self.wk = mk(H, d, r) / d ** 0.5, mk(H, d, r) / d ** 0.5
        self.shape = Shape(S, H, d, batch=1, block_q=args.block_q, block_kv=args.block_kv, lr_rank=r)
        self.dens = head_budgets(H, args.min_density, args.max_density, args.seed)
        self.blocks = [max(1, round(x * self.shape.n_kv)) for x in self.dens]
        s_local = S // group.size
        sl = slice(group.index * s_local, (group.index + 1) * s_local)
        self.shard = [t[sl].clone() for t in (self.q, self.k, self.v, self.do)]
        self.backend = args.backend

    def leaves(self, whole=False):
        q, k, v, do = (self.q, self.k, self.v, self.do) if whole else self.shard
        return [t.detach().requires_grad_() for t in (q, k, v)] + [do]

    def dsv_step(self, cp_plan):
        q, k, v, do = self.leaves()
        out = dsv_cp_attention(q, k, v, self.wq, self.wk, self.blocks, group=self.group, plan=cp_plan,
                               block_q=self.shape.block_q, block_kv=self.shape.block_kv, backend=self.backend)
        out.backward(do)

    def dense_step(self, U):
        q, k, v, do = self.leaves()
        dense_cp_attention(q, k, v, group=self.group, U=U).backward(do)

    def selection(self, q=None, k=None):
        """(kv_idx, kv_cnt) of the whole sequence, as the CP path selects it."""
        q, k, b = self.q if q is None else q, self.k if k is None else k, self.shape
        with torch.no_grad():
            q_lr = torch.einsum("sbhd,hdr->bshr", q, self.wq)
            k_lr = torch.einsum("sbhd,hdr->bshr", k, self.wk)
            return select_blocks(q_lr, k_lr, self.blocks, block_q=b.block_q, block_kv=b.block_kv, backend=self.backend)

    def one_gpu_step(self):
        """DSV on the whole sequence on this GPU alone: selection + block-sparse attention, same budgets."""
        q, k, v, do = self.leaves(whole=True)
        b = self.shape
        kv_idx, kv_cnt = self.selection(q, k)
        block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q=b.block_q, block_kv=b.block_kv, layout="sbhd",
                               backend=self.backend).backward(do)


def timed(group, fn, device, args) -> float:
    dist.barrier(group=group.group)
    return slowest(group, time_ms(fn, device, warmup=args.warmup, iters=args.iters))


def phases(group, fn, device) -> dict:
    """Milliseconds per CP phase of one call of fn, slowest rank per phase."""
    group.timer = ForwardTimer()
    try:
        fn()
        got = group.timer.read()
    finally:
        group.timer = None
    names = sorted(PHASES)
    vals = torch.tensor([got.get(n, 0.0) for n in names], dtype=torch.float64, device=group.device)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX, group=group.group)
    return {n: round(float(x), 3) for n, x in zip(names, vals.tolist())}


PHASES = ("a2a", "selection", "klr_gather", "exchange", "attention", "a2a_bwd", "attention_bwd", "exchange_bwd")


def predicted_ms(layer, cp_plan, cost) -> float:
    dens = to_densities(layer.blocks, layer.shape)
    est = estimate(layer.shape, dens, cp_plan.P, cp_plan.U, cp_plan.heads_of, cp_plan.schedule, cost, cp_plan.shares)
    return est["total"] * 1e3


def fixed_plans(layer, P, heads):
    """Every (U, assignment, schedule) the planner could choose, as fixed plans."""
    out = []
    for U in [u for u in range(1, P + 1) if P % u == 0 and u <= heads]:
        R = P // U
        costs = [head_compute_s(x, layer.shape, R, CostModel()) for x in to_densities(layer.blocks, layer.shape)]
        n_units = max(1, layer.S // (R * layer.shape.block_q))
        for assignment in (("naive", "lpt", "capped", "split") if U > 1 else ("naive",)):
            for schedule in (("gather", "ring") if R > 1 else ("gather",)):
                out.append(fixed_plan(P, U, heads, schedule=schedule, assignment=assignment, costs=costs,
                                      n_units=n_units))
    return out


def run_length(args, S, group, device, dtype, rank0):
    layer = Layer(args, S, group, device, dtype)
    P = group.size
    say = (lambda *a: print(*a, flush=True)) if rank0 else (lambda *a: None)
    rows = []
    cost, facts = measure_cost_model(group, layer.shape, dtype=dtype, backend=args.backend, iters=args.iters)
    union = kv_union(*layer.selection(), layer.shape.n_kv, P)
    cost = dataclasses.replace(cost, kv_union=union)
    links = facts["links"]
    say(f"[{S}] calibrated: head a2a {links['head_a2a_gbps'] or 0:.0f} GB/s (raw all_to_all "
        f"{links['raw_a2a_gbps']:.0f}), p2p {links['p2p_gbps']:.0f} GB/s, latency {links['latency_s'] * 1e6:.1f} us, "
        f"dense {cost.dense_tflops:.0f} TFLOP/s, sparse " + ", ".join(f"{x:.2f}:{r:.0f}" for x, r in cost.sparse_curve)
        + f"; kv_union of this selection {union:.2f}")

    # One GPU on the whole sequence: rank 0 times, the others wait.
    one = time_ms(layer.one_gpu_step, device, warmup=args.warmup, iters=args.iters) if rank0 else 0.0
    one = slowest(group, one)
    rows.append(dict(name="one GPU (whole sequence)", ms=one))
    say(f"[{S}] one GPU {one:.1f} ms")
    if S <= args.dense_max_tokens:
        for U, name in ((P, "dense ulysses"), (1, "dense ring (K/V all-gather)")):
            if U <= args.heads and not (U == 1 and P == 1 and name.startswith("dense ring")):
                ms = timed(group, lambda U=U: layer.dense_step(U), device, args)
                rows.append(dict(name=f"{name} U={U}", ms=ms))
                say(f"[{S}] {name} U={U}: {ms:.1f} ms")

    default, calibrated = plan(layer.blocks, shape=layer.shape, P=P), plan(layer.blocks, shape=layer.shape, P=P,
                                                                           cost=cost)
    # What the layer does by default on CUDA (cp_plan_search='auto'): the default model's best plan of each
    # (U, schedule), timed once (1 warm-up, best of 2), the fastest kept.
    measured, search_ms = fastest_plan(candidate_plans(layer.blocks, shape=layer.shape, P=P), layer.dsv_step, group)
    say(f"[{S}] plan search: " + ", ".join(f"{t:.1f}" for t in search_ms) + f" ms -> U={measured.U} {measured.schedule}")
    candidates = [("fixed", p) for p in fixed_plans(layer, P, args.heads)]
    candidates += [("planner (default cost)", default), ("planner (calibrated cost)", calibrated),
                   ("planner (measured pairs)", measured)]
    for kind, cp_plan in candidates:
        ms = timed(group, lambda p=cp_plan: layer.dsv_step(p), device, args)
        parts = phases(group, lambda p=cp_plan: layer.dsv_step(p), device)
        name = (f"dsv U={cp_plan.U} {cp_plan.assignment} {cp_plan.schedule}" if kind == "fixed"
                else f"dsv {kind}: U={cp_plan.U} {cp_plan.assignment} {cp_plan.schedule}")
        row = dict(name=name, kind=kind, ms=ms, U=cp_plan.U, assignment=cp_plan.assignment,
                   schedule=cp_plan.schedule, imbalance=cp_plan.imbalance, phases_ms=parts,
                   predicted_default_ms=predicted_ms(layer, cp_plan, CostModel()),
                   predicted_calibrated_ms=predicted_ms(layer, cp_plan, cost), heads_of=cp_plan.heads_of)
        rows.append(row)
        say(f"[{S}] {name}: {ms:.1f} ms (predicted {row['predicted_default_ms']:.1f} default, "
            f"{row['predicted_calibrated_ms']:.1f} calibrated) {parts}")

    fixed = [r for r in rows if r.get("kind") == "fixed"]
    best = min(fixed, key=lambda r: r["ms"])
    for r in rows:
        r["speedup_vs_one_gpu"] = one / r["ms"]
    summary = dict(tokens=S, one_gpu_ms=one, best_fixed=best["name"], best_fixed_ms=best["ms"],
                   dense_ulysses_ms=next((r["ms"] for r in rows if r["name"].startswith("dense ulysses")), None),
                   mean_density=sum(layer.blocks) / len(layer.blocks) / layer.shape.n_kv)
    for r in rows:
        if r.get("kind", "").startswith("planner"):
            key = next(k for k in ("calibrated", "measured", "default") if k in r["kind"])
            model = "calibrated" if key == "calibrated" else "default"
            summary[f"planner_{key}"] = dict(name=r["name"], ms=r["ms"], vs_best=r["ms"] / best["ms"],
                                             predicted_ms=r[f"predicted_{model}_ms"],
                                             prediction_error=r[f"predicted_{model}_ms"] / r["ms"] - 1)
    return dict(summary=summary, rows=rows, calibration=dict(cost=_asdict(cost), measured=facts))


def _asdict(cost):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cost).items()}


def table(results) -> str:
    lines = ["| tokens | variant | ms | x one GPU | predicted ms (default / calibrated) |", "|---|---|---|---|---|"]
    for res in results:
        S = res["summary"]["tokens"]
        for r in res["rows"]:
            pred = (f"{r['predicted_default_ms']:.1f} / {r['predicted_calibrated_ms']:.1f}"
                    if "predicted_default_ms" in r else "")
            lines.append(f"| {S // 1024}k | {r['name']} | {r['ms']:.1f} | {r['speedup_vs_one_gpu']:.2f}x | {pred} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rank", type=int, default=32, help="predictor rank (DSVConfig.rank)")
    ap.add_argument("--block-q", type=int, default=64)
    ap.add_argument("--block-kv", type=int, default=64)
    ap.add_argument("--min-density", type=float, default=0.02)
    ap.add_argument("--max-density", type=float, default=0.30)
    ap.add_argument("--seed", type=int, default=0, help="head order of the budgets")
    ap.add_argument("--dense-max-tokens", type=int, default=131072, help="skip dense rows above this length")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, float32, tiny shapes (checks the script)")
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.heads, args.head_dim, args.rank = [1024], 4, 16, 8
        args.block_q = args.block_kv = 64
        args.warmup, args.iters, args.backend = 0, 1, "reference"
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    group = HybridCPGroup()
    rank0 = group.index == 0
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu"]
    meta = dict(devices=names, P=group.size, torch=torch.__version__, dtype=str(dtype), args=vars(args))
    results = []
    for S in args.tokens:
        results.append(run_length(args, S, group, device, dtype, rank0))
        if rank0 and args.json:   # after each length: a run stopped by a time limit keeps the lengths it finished
            Path(args.json).write_text(json.dumps(dict(meta=meta, results=results), indent=1, default=str))
    if rank0:
        print(table(results))
        for res in results:
            s = res["summary"]
            print(f"{s['tokens'] // 1024}k: best fixed {s['best_fixed']} {s['best_fixed_ms']:.1f} ms "
                  f"({s['one_gpu_ms'] / s['best_fixed_ms']:.2f}x one GPU"
                  + (f", {s['dense_ulysses_ms'] / s['best_fixed_ms']:.2f}x dense Ulysses" if s["dense_ulysses_ms"] else "")
                  + "); " + "; ".join(f"{k}: {v['name']} {v['ms']:.1f} ms = {v['vs_best']:.2f}x best, predicted "
                                      f"{v['predicted_ms']:.1f} ({v['prediction_error']:+.0%})"
                                      for k, v in s.items() if k.startswith("planner_")))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
