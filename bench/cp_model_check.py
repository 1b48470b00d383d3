"""The CP planner's cost model against what bench/cp_bench.py measured: offline, from its JSON.

For every length of every given run, each fixed plan's measured time beside the time the cost model
predicts for it now (the run's calibrated links and kernel rates, the model's current split factors),
and the plan the model alone picks (`plan()` with that cost) against the fastest measured plan.

The split factors (CostModel.split_compute_factor, split_exchange_factors: what a rank holding part of
the sequence pays beyond its share of the compute and the exchange's bytes) are fitted here: --fit
grid-searches them on the plans that split the sequence (R > 1) of some runs and scores them on the
others, minimising the mean |log(predicted / measured)|.

    python bench/cp_model_check.py bench/results/cp_h200x2/cp_bench.json bench/results/cp_h200x4/cp_bench_h200x4.json
    python bench/cp_model_check.py --fit bench/results/cp_h200x2/cp_bench.json bench/results/cp_h200x4/cp_bench_h200x4.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dsv.cp import CostModel, Shape, estimate, fixed_plan, plan  # noqa: E402
from megatron_dsv.cp.planner import densities as to_densities, head_compute_s  # noqa: E402
from cp_bench import head_budgets  # noqa: E402


def lengths(path: str):
    """(name, P, shape, budgets, calibrated cost, {(U, assignment, schedule): measured s}) per length."""
    run = json.loads(Path(path).read_text())
    meta, a = run["meta"], run["meta"]["args"]
    for res in run["results"]:
        measured = {}
        for row in res["rows"]:
            if row["name"].startswith("dsv U="):
                U, assignment, schedule = row["name"].split()[1:]
                measured[int(U[2:]), assignment, schedule] = row["ms"] * 1e-3
        if not measured or "calibration" not in res:
            continue
        S = res["summary"]["tokens"]
        shape = Shape(S, a["heads"], a["head_dim"], batch=1, block_q=a["block_q"], block_kv=a["block_kv"],
                      lr_rank=a["rank"])
        budgets = [max(1, round(x * shape.n_kv)) for x in head_budgets(a["heads"], a["min_density"],
                                                                       a["max_density"], a["seed"])]
        c = res["calibration"]["cost"]
        cost = CostModel(intra_node_gbps=c["intra_node_gbps"], latency_s=c["latency_s"], dense_tflops=c["dense_tflops"],
                         sparse_curve=tuple(map(tuple, c["sparse_curve"])), kv_union=c["kv_union"])
        yield f"{meta['P']}x {S // 1024}k", meta["P"], shape, budgets, cost, measured


@functools.lru_cache(maxsize=None)
def placed(key, P, shape, budgets: tuple):
    """(densities, the fixed plan of key) as cp_bench placed it: independent of the cost model (its heads
    are placed by the default model's compute), so made once per plan, not once per factor tried."""
    U, assignment, schedule = key
    dens = to_densities(list(budgets), shape)
    R = P // U
    costs = [head_compute_s(x, shape, R, CostModel()) for x in dens]
    return dens, fixed_plan(P, U, shape.heads, schedule=schedule, assignment=assignment, costs=costs,
                            n_units=max(1, shape.seq_len // (R * shape.block_q)))


def predicted_s(key, P, shape, budgets, cost) -> float:
    dens, p = placed(key, P, shape, tuple(budgets))
    return estimate(shape, dens, P, key[0], p.heads_of, key[2], cost, p.shares)["total"]


def with_factors(cost: CostModel, compute: float, exchange: dict) -> CostModel:
    return dataclasses.replace(cost, split_compute_factor=compute, split_exchange_factors=tuple(exchange.items()))


def log_error(cases, compute: float, exchange: dict) -> float:
    return sum(abs(math.log(predicted_s(k, P, shape, b, with_factors(cost, compute, exchange)) / ms))
               for k, P, shape, b, cost, ms in cases) / len(cases)


def fit(runs):
    """Grid search of the split factors on the R > 1 plans of each run (leaving that run out in turn) and
    on all of them."""
    split = {path: [(k, P, shape, b, cost, ms) for _, P, shape, b, cost, m in lengths(path)
                    for k, ms in m.items() if P // k[0] > 1] for path in runs}
    grid = [1.0 + 0.05 * i for i in range(41)]
    for held_out in [None, *runs] if len(runs) > 1 else [None]:
        train = [c for path, cs in split.items() if path != held_out for c in cs]
        best = {}
        for schedule in ("gather", "ring"):
            cases = [c for c in train if c[0][2] == schedule]
            best[schedule] = min(((fc, fx) for fc in grid for fx in grid),
                                 key=lambda f: log_error(cases, f[0], {"gather": f[1], "ring": f[1]}))
        print(f"fitted on {'all runs' if held_out is None else 'all but ' + held_out}: compute factor "
              + ", ".join(f"{s} {f[0]:.2f}" for s, f in best.items()) + "; exchange factor "
              + ", ".join(f"{s} {f[1]:.2f}" for s, f in best.items()))
        if held_out is not None:
            for name, cases in (("fitted", train), ("held out", split[held_out])):
                errs = []
                for c in cases:
                    fc, fx = best[c[0][2]]
                    errs.append(log_error([c], fc, {"gather": fx, "ring": fx}))
                print(f"  {name}: mean |log(predicted / measured)| {sum(errs) / len(errs):.3f}, max {max(errs):.3f}")


def check(runs):
    out = []
    print("| run | plan | measured ms | predicted ms | error |")
    print("|---|---|---|---|---|")
    for path in runs:
        for name, P, shape, budgets, cost, measured in lengths(path):
            for key, ms in sorted(measured.items()):
                pred = predicted_s(key, P, shape, budgets, cost)
                out.append(dict(run=name, plan=list(key), measured_ms=ms * 1e3, predicted_ms=pred * 1e3))
                print(f"| {name} | U={key[0]} {key[1]} {key[2]} | {ms * 1e3:.1f} | {pred * 1e3:.1f} | {pred / ms - 1:+.0%} |")
    print()
    for path in runs:
        for name, P, shape, budgets, cost, measured in lengths(path):
            chosen = plan(budgets, shape=shape, P=P, cost=cost)
            key = (chosen.U, chosen.assignment, chosen.schedule)
            best = min(measured, key=measured.get)
            got = measured.get(key)
            print(f"{name}: the model picks U={key[0]} {key[1]} {key[2]}, predicted {chosen.predicted_s * 1e3:.1f} ms, "
                  + (f"measured {got * 1e3:.1f} ms = {got / measured[best]:.2f}x the fastest measured plan"
                     if got else "not measured") + f" (U={best[0]} {best[1]} {best[2]}, {measured[best] * 1e3:.1f} ms)")
            out.append(dict(run=name, chosen=list(key), chosen_measured_ms=got and got * 1e3,
                            chosen_predicted_ms=chosen.predicted_s * 1e3, fastest=list(best),
                            fastest_ms=measured[best] * 1e3))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="bench/cp_bench.py JSON files")
    ap.add_argument("--fit", action="store_true", help="fit the split factors instead")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.fit:
        fit(args.runs)
        return
    rows = check(args.runs)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(runs=args.runs, model=dataclasses.asdict(CostModel()), rows=rows),
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
