"""Quality run: the example DiT trained dense and with DSV from the same seed for the same steps.

Runs examples/pretrain_video_dit.py twice (--dense, then DSV) with the same arguments,
then writes to --out:
  dense.jsonl, dsv.jsonl        progress records of each run (loss, val loss, DSV summary)
  dsv_metrics.jsonl             per-layer, per-head DSV record of the DSV run
  loss_curves.png               train loss (smoothed) and validation loss of both runs
  dsv_profile.png               per-layer x per-head sparsity, budget and recall (megatron_dsv.plot)
  quality.json                  final validation losses, their relative gap, mean sparsity,
                                recall, steps, wall time, device

    python bench/quality.py --out bench/results/quality_h100 -- --model small --train-iters 2000 \\
        --data images --eval-interval 200 --eval-iters 8 --log-interval 10
    python bench/quality.py --out /tmp/q -- --train-iters 20 --latent-shape 4 16 16   # CPU check

Arguments after "--" go to both runs unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, name: str, train_args, dense: bool) -> float:
    log = out / f"{name}.jsonl"
    log.unlink(missing_ok=True)
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "examples" / "pretrain_video_dit.py"), *train_args,
           "--log-json", str(log)]
    if dense:
        cmd.append("--dense")
    else:
        (out / "dsv_metrics.jsonl").unlink(missing_ok=True)
        cmd += ["--dsv-log", str(out / "dsv_metrics.jsonl")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.time()
    with open(out / f"{name}.log", "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"{name} run failed (exit {proc.returncode}); see {out / (name + '.log')}")
    return time.time() - t0


def records(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values, alpha=0.9):
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def plot_losses(out: Path, runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, recs in runs.items():
        ax1.plot([r["step"] for r in recs], smooth([r["loss"] for r in recs]), label=name)
        val = [(r["step"], r["val_loss"]) for r in recs if r["val_loss"] is not None]
        ax2.plot(*zip(*val), marker="o", label=name)
    ax1.set(title="train loss (EMA 0.9)", xlabel="step", ylabel="flow-matching MSE")
    ax2.set(title="validation loss (fixed held-out set)", xlabel="step")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)


def main():
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv[:split])
    train_args = argv[split + 1:]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    wall = {name: run(out, name, train_args, dense=(name == "dense")) for name in ("dense", "dsv")}
    runs = {name: records(out / f"{name}.jsonl") for name in ("dense", "dsv")}
    plot_losses(out, runs)
    subprocess.run([sys.executable, "-m", "megatron_dsv.plot", str(out / "dsv_metrics.jsonl"), "--out",
                    str(out / "dsv_profile.png")], check=True, cwd=ROOT)

    def final_val(recs):
        vals = [r["val_loss"] for r in recs if r["val_loss"] is not None]
        return vals[-1] if vals else None

    last = runs["dsv"][-1]["dsv"]
    dense_val, dsv_val = final_val(runs["dense"]), final_val(runs["dsv"])
    device = (out / "dsv.log").read_text().splitlines()[0]
    summary = {
        "args": train_args, "model_line": device, "steps": runs["dsv"][-1]["step"],
        "final_val_loss": {"dense": dense_val, "dsv": dsv_val},
        "val_gap_rel": (dsv_val - dense_val) / dense_val if dense_val and dsv_val is not None else None,
        "final_train_loss_ema": {k: smooth([r["loss"] for r in v])[-1] for k, v in runs.items()},
        "dsv_stage": last["stage"], "dsv_sparse_layers": last["sparse_layers"], "dsv_layers": last["layers"],
        "dsv_block_sparsity": last["block_sparsity"], "dsv_oracle_block_sparsity": last["oracle_block_sparsity"],
        "dsv_token_sparsity": last["token_sparsity"],
        "dsv_recall": last["recall"], "dsv_predictor_loss": last["predictor_loss"],
        "tokens_per_s_last": {k: v[-1]["tokens_per_s"] for k, v in runs.items()},
        "wall_s": wall,
    }
    (out / "quality.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
