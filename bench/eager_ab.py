"""Eager training steps of the example, dense against DSV stage 1, interleaved step by step.

bench/step.py times its arms one after another, each for ~10 steps. Eager steps of a small model
depend on how fast the host launches, and a shared host's speed drifts within a minute: in one run
eager dense took 119 ms, in the next 104 ms (bench/results/step_h200/s12). Here every round runs one
step of each arm, in turn, so a drift reaches all arms alike; the medians over the rounds are
compared, and the median of each round's ratio ("paired"). Arms (the `small` model, 16k tokens x batch 2, as
bench/step.py builds it):

  dense                        SDPADotProductAttention, eager
  dsv-stage1                   DSV in stage 1 (dense attention + predictor training), eager: the
                               predictor's training replayed from a per-layer CUDA graph
  dsv-stage1, no CUDA graphs   the same with DSVConfig.cuda_graphs off (launched op by op)
  dsv-stage2                   DSV in stage 2, every layer sparse at --density of its KV blocks (uniform
                               budgets, as bench/step.py's dsv-stage2), steps that do not profile: the
                               selection and attention replayed from per-layer CUDA graphs
  dense / dsv-stage1 / dsv-stage2, step graph   forward + backward replayed from one CUDA graph: the step's GPU time
  ..., upkeep on the step stream   the DSV stage-1 arms with the predictor's upkeep on the step's own stream
                               (megatron_dsv.layers.upkeep_stream.ENABLED False), as before 2026-12-01;
                               on the GPU only (on CPU there is no upkeep stream)

After the rounds, one step of each eager arm runs under torch.cuda.set_sync_debug_mode("warn"): the
host syncs that mode reports are listed (a sync empties the launch queue and leaves the GPU waiting
for the host; waits on CUDA events, e.g. dsv_metrics' on the forward's timing events, are not
reported). Prints a table last; --json writes it with the device name.

    python bench/eager_ab.py --json bench/results/step_h200/s12/eager_ab.json
    python bench/eager_ab.py --smoke    # CPU, tiny shapes, eager arms only: checks the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch

from step import Trainer, init_single_process, record, set_state, DSVConfig, PRESETS  # noqa: E402 (bench/ is on the path)
from megatron_dsv.layers import upkeep_stream  # noqa: E402


def syncs_of_one_step(trainer) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (The mode's own notice on first use, "Synchronization debug mode is a prototype feature", is not a sync.)
    return [str(w.message).splitlines()[0] + " @ " + f"{w.filename}:{w.lineno}" for w in caught
            if "called a synchronizing" in str(w.message)]


def stage1_setup(doc: str, script: str, *, micro_batch_size: int, rounds: int, smoke_help: str,
                 stage2_arms: bool = False) -> tuple:
    """(args, device, DiT config, DSV stage-1 config) of an interleaved eager stage-1 benchmark (this one,
    bench/host_time.py): its command line parsed (with stage2_arms, also the stage-2 arms' --density), the
    process set up."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(PRESETS))
    p.add_argument("--micro-batch-size", type=int, default=micro_batch_size)
    p.add_argument("--data", default="images", choices=["shapes", "images"])
    p.add_argument("--cube", type=int, nargs=3, default=[4, 4, 4])
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    if stage2_arms:
        p.add_argument("--density", type=float, default=0.12, help="stage-2 arms: share of KV blocks per head")
    args = p.parse_args()
    if not (args.smoke or torch.cuda.is_available()):
        raise SystemExit(f"{script} needs a GPU (use --smoke to check the script on CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    init_single_process(device)
    dit = PRESETS[args.model]
    # Stage 1 for good, no profile steps (as bench/step.py's dsv-stage1 arm).
    stage1 = DSVConfig(loss_threshold=0.0, stage1_max_steps=1 << 40, profile_interval_stage1=1 << 30)
    if args.smoke:   # bench/step.py's smoke shapes
        args.model, args.warmup, args.rounds, args.data = "tiny", 1, 2, "shapes"
        dit = PRESETS["tiny"].replace(latent_shape=(4, 16, 16))
        stage1 = stage1.replace(block_q=32, block_kv=32, cube=(2, 4, 4))
        args.cube = list(stage1.cube)
    return args, device, dit, stage1


def main():
    args, device, dit, stage1 = stage1_setup(__doc__, "bench/eager_ab.py", micro_batch_size=2, rounds=30,
                                             smoke_help="CPU, tiny shapes, eager arms only: checks the script",
                                             stage2_arms=True)
    tokens = dit.num_tokens * args.micro_batch_size
    # Stage 2 for good at uniform budgets, no profile steps (bench/step.py's dsv-stage2 arm).
    stage2 = stage1.replace(budget_policy="theta", layer_sparsity_threshold=0.0, budget_floor=0.0,
                            profile_interval_stage2=1 << 30)
    arms = {"dense": Trainer(dit, None, args, device),
            "dsv-stage1": Trainer(dit, stage1, args, device),
            "dsv-stage1, no CUDA graphs": Trainer(dit, stage1.replace(cuda_graphs=False), args, device),
            "dsv-stage2": Trainer(dit, stage2, args, device)}
    if not args.smoke:   # step graphs need the GPU
        arms.update({"dense, step graph": Trainer(dit, None, args, device, step_graph=True),
                     "dsv-stage1, step graph": Trainer(dit, stage1, args, device, step_graph=True),
                     "dsv-stage2, step graph": Trainer(dit, stage2, args, device, step_graph=True)})
    for name in [n for n in arms if n.startswith("dsv-stage1") and not args.smoke]:   # (no upkeep stream on CPU)
        arms[name + ", upkeep on the step stream"] = Trainer(dit, arms[name].cfg, args, device,
                                                             step_graph=arms[name].captured is not None)
    aside = {name: not name.endswith("upkeep on the step stream") for name in arms}
    for name, trainer in arms.items():
        upkeep_stream.ENABLED = aside[name]
        if trainer.dsv:
            stage = 2 if name.startswith("dsv-stage2") else 1
            set_state(trainer.layers, stage=stage, step=1, density=args.density if stage == 2 else None)
        for _ in range(args.warmup):
            trainer.step()
    times = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, trainer in arms.items():
            upkeep_stream.ENABLED = aside[name]
            times[name].append(trainer.step())
    upkeep_stream.ENABLED = True
    syncs = ({} if args.smoke else
             {name: syncs_of_one_step(arms[name])
              for name in ("dsv-stage1", "dsv-stage1, no CUDA graphs", "dsv-stage2", "dense")})
    # bench/step.py's record of each arm's medians (step ms = train ms, host ms), plus the step's quartiles.
    rows = [record(name, [statistics.median(t[i] for t in parts) for i in range(4)], tokens,
                   step_ms_quartiles=statistics.quantiles([t[1] for t in parts], n=4))
            for name, parts in times.items()]
    dense = rows[0]["step_ms"]
    graphed_dense = next((r["step_ms"] for r in rows if r["mode"] == "dense, step graph"), None)
    for r, (name, parts) in zip(rows, times.items()):
        r["speedup_vs_dense"] = dense / r["step_ms"]
        # Paired: the median over rounds of dense's step over this arm's step of the same round, which a drift
        # of the host's speed from round to round moves less than it moves either median.
        r["paired_speedup_vs_dense"] = statistics.median(d[1] / t[1] for d, t in zip(times["dense"], parts))
        r["step_ms_per_round"] = [t[1] for t in parts]
        if arms[name].dsv:   # the layers that ran sparse (at the captured forward, for a step graph)
            r["sparse_layers"] = sum(bool(layer.last_used_sparse) for layer in arms[name].layers)
        if graphed_dense:
            r["speedup_vs_dense_step_graph"] = graphed_dense / r["step_ms"]
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    out = {"device": name, "torch": torch.__version__, "model": args.model, "tokens_per_step": tokens,
           "rounds": args.rounds, "results": rows, "syncs_in_one_step": syncs}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    for arm, found in syncs.items():
        print(f"host syncs in one eager step, {arm}: {len(found)}")
        for line in found[:8]:
            print("   ", line)
    print(f"\n{name}; {args.model}, {dit.num_tokens} tokens x batch {args.micro_batch_size}; medians of "
          f"{args.rounds} interleaved rounds")
    print(f"{'mode':>54} {'step ms':>8} {'quartiles':>13} {'host ms':>8} {'x dense':>8} {'paired':>7} "
          f"{'x graphed dense':>15}")
    for r in rows:
        q1, _, q3 = r["step_ms_quartiles"]
        graphed = f"{r['speedup_vs_dense_step_graph']:.3f}" if graphed_dense else "-"
        print(f"{r['mode']:>54} {r['step_ms']:>8.1f} {q1:>6.1f}-{q3:<6.1f} {r['train_host_ms']:>8.1f} "
              f"{r['speedup_vs_dense']:>8.3f} {r['paired_speedup_vs_dense']:>7.3f} {graphed:>15}")


if __name__ == "__main__":
    main()
