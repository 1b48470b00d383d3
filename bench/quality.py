"""Quality runs: the example DiT trained dense and with DSV arms, from the same seeds, for the same steps.

Runs examples/pretrain_video_dit.py once per (arm, seed): the dense baseline (--dense) and every
--arm (a name and the extra flags of that DSV variant; default: one arm "dsv" with no extra flags),
for every --seeds value. Arguments after "--" go to every run unchanged. Writes to --out:

  <arm>_s<seed>.jsonl          progress records of each run (loss, val loss, DSV summary)
  <arm>_s<seed>_dsv.jsonl      per-layer, per-head DSV records of each DSV run
  loss_curves.png              validation loss of every run
  dsv_profile_<arm>.png        per-layer x per-head profile of each arm's first seed (megatron_dsv.plot)
  quality.json                 per arm: final validation loss per seed, gap to dense of the same seed,
                               mean gap and seed-to-seed spread, sparse layers, recall, held mass, density

--parallel N runs N at a time, each on the visible GPU with the fewest runs: fine for losses, but wall
times and tokens/s of runs that share a GPU are not speed measurements (bench/step.py and
bench/e2e.py are). With --parallel at most the number of GPUs (or 1, the default), every run has a
GPU to itself (the host's cores are shared) and the closing table also gives each run's wall time
against dense's, its replayed steps, its median step time per DSV stage and each stage's training
time against dense's over the same steps ("speed" in quality.json, from the train_s the runs log):
the end-to-end view of a training run (log every step for full coverage). Runs go in
order dense, then each arm, seed by seed, so with --parallel 2 on two GPUs dense and one arm of a
seed run side by side.

    python bench/quality.py --out bench/results/quality_policy_h200 --seeds 7 8 --parallel 6 \\
        --arm target "--dsv-budget-policy target" --arm uniform "--dsv-budget-policy uniform" \\
        -- --model small --data images --train-iters 1000 --eval-interval 100 --eval-iters 4 --log-interval 50
    python bench/quality.py --out /tmp/q -- --train-iters 20 --latent-shape 4 16 16   # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(out: Path, name: str, train_args, extra, dense: bool):
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "examples" / "pretrain_video_dit.py"), *train_args, *extra,
           "--log-json", str(out / f"{name}.jsonl")]
    if dense:
        cmd.append("--dense")
    else:
        cmd += ["--dsv-log", str(out / f"{name}_dsv.jsonl")]
    return cmd


def run_all(out: Path, jobs, parallel: int, gpus: int) -> dict:
    """jobs: [(name, cmd)]; runs them `parallel` at a time, each on the GPU with the fewest runs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    pending, running, wall = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd = pending.pop(0)
            for suffix in (".jsonl", "_dsv.jsonl"):
                (out / f"{name}{suffix}").unlink(missing_ok=True)
            gpu = min(range(max(gpus, 1)), key=lambda g: sum(r[3] == g for r in running.values()))
            job_env = dict(env, CUDA_VISIBLE_DEVICES=str(gpu)) if gpus > 1 else env
            log = open(out / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=job_env), log,
                             time.time(), gpu)
        time.sleep(1)
        for name, (proc, log, t0, _) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                wall[name] = time.time() - t0
                del running[name]
                if proc.returncode:
                    raise SystemExit(f"{name} failed (exit {proc.returncode}); see {out / (name + '.log')}")
                print(f"{name}: done in {wall[name]:.0f} s", flush=True)
    return wall


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def records(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_val(recs):
    vals = [r["val_loss"] for r in recs if r["val_loss"] is not None]
    return vals[-1] if vals else None


def plot_losses(out: Path, runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, recs in sorted(runs.items()):
        val = [(r["step"], r["val_loss"]) for r in recs if r["val_loss"] is not None]
        ax.plot(*zip(*val), marker="o", ms=3, label=name, ls="--" if name.startswith("dense") else "-")
    ax.set(title="validation loss (fixed held-out set)", xlabel="step", ylabel="flow-matching MSE")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)


def arm_summary(out: Path, arm: str, seeds, runs: dict) -> dict:
    vals = {s: final_val(runs[f"{arm}_s{s}"]) for s in seeds}
    dense = {s: final_val(runs[f"dense_s{s}"]) for s in seeds}
    rec = {"final_val_loss": vals}
    if arm != "dense":
        gaps = {s: (vals[s] - dense[s]) / dense[s] for s in seeds}
        rec.update(val_gap_rel=gaps, val_gap_rel_mean=statistics.mean(gaps.values()),
                   val_gap_rel_spread=max(gaps.values()) - min(gaps.values()))
        last = [records(out / f"{arm}_s{s}_dsv.jsonl")[-1] for s in seeds]
        rec.update(
            sparse_layers=[r["summary"]["sparse_layers"] for r in last], layers=last[0]["summary"]["layers"],
            density=[statistics.mean(statistics.mean(l["budget"]) if l["sparse"] else 1.0 for l in r["layers"])
                     for r in last],
            recall=[r["summary"]["recall"] for r in last], held_mass=[r["summary"].get("held_mass") for r in last],
            block_sparsity=[r["summary"]["block_sparsity"] for r in last],
            oracle_block_sparsity=[r["summary"]["oracle_block_sparsity"] for r in last],
            token_sparsity=[r["summary"]["token_sparsity"] for r in last])
    return rec


def speed_summary(out: Path, name: str, recs, wall: float, dense_recs) -> dict:
    """Whole-run wall time, the median logged step time of each DSV stage (0 = dense), the last logged step
    of each stage and each stage's training time against dense's over the same steps (dense_recs: the
    dense run of the same seed), from one run's progress records (every --log-interval-th step) and log
    (the replayed-step count)."""
    by_stage, last = {}, {}
    for r in recs:
        stage = (r.get("dsv") or {}).get("stage", 0)
        by_stage.setdefault(stage, []).append(r["step_s"])
        last[stage] = r["step"]
    # the closing "done: ..." line (not the log's last line: a process-group warning may follow it)
    replayed = re.search(r"^done: .*\((\d+) replayed from CUDA graphs\)", (out / f"{name}.log").read_text(),
                         re.MULTILINE)
    return {"wall_s": wall, "step_s_median": {st: statistics.median(v) for st, v in sorted(by_stage.items())},
            "logged_steps": {st: len(v) for st, v in sorted(by_stage.items())},
            "last_logged_step": dict(sorted(last.items())),
            "stage_x_dense": stage_speedups(recs, dense_recs, last),
            "replayed_steps": int(replayed.group(1)) if replayed else None}


def train_s_between(recs, first: int, last: int) -> float:
    """Training time of steps first+1 .. last from the cumulative train_s of the records logged at those
    steps (step 0: none yet)."""
    at = {0: 0.0, **{r["step"]: r["train_s"] for r in recs}}
    return at[last] - at[first]


def stage_speedups(recs, dense_recs, last: dict) -> dict:
    """Per stage: dense's training time over the same steps / this run's (the steps after the previous
    stage's last logged step up to this stage's, `last`; the switch falls within one log interval)."""
    if not recs or "train_s" not in recs[0]:
        return {}
    prev, out = 0, {}
    for stage, end in sorted(last.items(), key=lambda kv: kv[1]):
        try:
            out[stage] = train_s_between(dense_recs, prev, end) / train_s_between(recs, prev, end)
        except (KeyError, ZeroDivisionError):   # dense logged at other steps
            pass
        prev = end
    return out


def main():
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[7])
    p.add_argument("--arm", nargs=2, action="append", metavar=("NAME", "FLAGS"), default=None,
                   help="a DSV variant: its name and its extra flags (one string); repeatable")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (over the visible GPUs)")
    args = p.parse_args(argv[:split])
    train_args = argv[split + 1:]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = [("dense", None)] + [(name, shlex.split(flags)) for name, flags in (args.arm or [("dsv", "")])]

    jobs = [(f"{arm}_s{seed}", command(out, f"{arm}_s{seed}", [*train_args, "--seed", str(seed)], extra or [],
                                       dense=extra is None))
            for seed in args.seeds for arm, extra in arms]
    gpus = _gpu_count()
    wall = run_all(out, jobs, args.parallel, gpus)
    runs = {name: records(out / f"{name}.jsonl") for name, _ in jobs}
    plot_losses(out, runs)
    for arm, _ in arms[1:]:
        subprocess.run([sys.executable, "-m", "megatron_dsv.plot", str(out / f"{arm}_s{args.seeds[0]}_dsv.jsonl"),
                        "--out", str(out / f"dsv_profile_{arm}.png")], check=True, cwd=ROOT)
    summary = {
        "args": train_args, "seeds": args.seeds, "arms": {arm: (extra or []) for arm, extra in arms},
        "model_line": (out / f"{jobs[0][0]}.log").read_text().splitlines()[0],
        "steps": runs[jobs[0][0]][-1]["step"], "parallel": args.parallel, "gpus": gpus,
        "results": {arm: arm_summary(out, arm, args.seeds, runs) for arm, _ in arms},
        "wall_s": wall,
        "speed": {name: speed_summary(out, name, runs[name], wall[name], runs[f"dense_s{name.rsplit('_s', 1)[1]}"])
                  for name, _ in jobs},
    }
    (out / "quality.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{summary['model_line']}\n{'arm':>10} " + " ".join(f"{'val s' + str(s):>10}" for s in args.seeds)
          + f" {'gap mean':>9} {'spread':>7} {'density':>8} {'recall':>7} {'held':>6}")
    for arm, rec in summary["results"].items():
        vals = " ".join(f"{rec['final_val_loss'][s]:>10.4f}" for s in args.seeds)
        if arm == "dense":
            print(f"{arm:>10} {vals}")
            continue
        mean = (lambda xs: statistics.mean(x for x in xs if x is not None) if any(x is not None for x in xs)
                else float("nan"))
        print(f"{arm:>10} {vals} {100 * rec['val_gap_rel_mean']:>8.2f}% {100 * rec['val_gap_rel_spread']:>6.2f}% "
              f"{mean(rec['density']):>8.3f} {mean(rec['recall']):>7.3f} {mean(rec['held_mass']):>6.3f}")
    if args.parallel <= max(gpus, 1):   # a GPU per run: the wall times are speed measurements
        print(f"\n{'run':>12} {'wall s':>7} {'x dense':>8} {'replayed':>8}  median step s by stage (logged steps; "
              f"training time x dense over the stage's steps)")
        for name, sp in summary["speed"].items():
            dense_wall = wall[f"dense_s{name.rsplit('_s', 1)[1]}"]
            stages = ", ".join(f"{'dense' if st == 0 else f'stage {st}'} {t:.3f} ({sp['logged_steps'][st]}"
                               + (f"; {sp['stage_x_dense'][st]:.2f}x" if st and st in sp["stage_x_dense"] else "")
                               + ")" for st, t in sp["step_s_median"].items())
            print(f"{name:>12} {sp['wall_s']:>7.0f} {dense_wall / sp['wall_s']:>8.2f} "
                  f"{sp['replayed_steps'] if sp['replayed_steps'] is not None else '-':>8}  {stages}")


if __name__ == "__main__":
    main()
