"""Draw per-layer x per-head heatmaps of DSV's profile from a metrics log.

    python -m megatron_dsv.plot runs/dsv_metrics.jsonl [--out dsv.png] [--step N]

The log is the JSON-lines file written by ``megatron_dsv.layers.append_jsonl`` (the
example pretraining script writes one). Panels: token sparsity (the paper's measure),
block sparsity (what drives each head's budget), oracle block sparsity (the same with blocks
ranked by their true mass: what a perfect predictor would allow), the budget actually used,
the share of attention mass that budget holds by the head's profiled mass curve, and recall
(share of the true attention mass inside the selected blocks, on sampled rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

PANELS = ("token_sparsity", "block_sparsity", "oracle_block_sparsity", "budget", "held_mass", "recall")


def load_record(path: str, step=None) -> dict:
    """The record of `step`, or the last one in the log. A line cut short (a run killed while writing it; a
    resumed run appends after it) is skipped with a notice; a record that is not DSV's metrics is an error."""
    record = None
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"{path}: line {n} is cut short or not JSON ({e.msg}): skipped", file=sys.stderr)
                continue
            if not (isinstance(rec, dict) and {"step", "layers", "summary"} <= rec.keys()):
                raise ValueError(f"{path}: line {n} is not a DSV metrics record (it lacks 'step', 'layers' or "
                                 "'summary'): pass the --dsv-log file (megatron_dsv.layers.append_jsonl), not "
                                 "--log-json's")
            if step is None or rec["step"] == step:
                record = rec
    if record is None:
        raise ValueError(f"{path}: no record" + (f" for step {step}" if step is not None else ""))
    if not record["layers"]:
        raise ValueError(f"{path}: the record of step {record['step']} holds no DSV layer")
    return record


def heatmap_rows(record: dict, key: str):
    """[layers][heads] values (NaN where not profiled yet) and layer labels."""
    layers = record["layers"]
    values = [l.get(key, []) for l in layers]  # logs from before a statistic existed lack it
    heads = max((len(v) for v in values), default=0)
    rows = [[(x if x is not None else math.nan) for x in v] + [math.nan] * (heads - len(v)) for v in values]
    return rows, [f"L{l['layer']} s{l['stage']}{'*' if l['sparse'] else ''}" for l in layers]


def plot(record: dict, out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("megatron_dsv.plot needs matplotlib: pip install matplotlib") from e
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 1 + 0.35 * len(record["layers"])),
                             squeeze=False)
    for ax, key in zip(axes[0], PANELS):
        rows, labels = heatmap_rows(record, key)
        im = ax.imshow(rows, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("head")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels if ax is axes[0][0] else [])
        fig.colorbar(im, ax=ax, fraction=0.046)
    s = record["summary"]
    recall = "n/a" if s.get("recall") is None else f"{s['recall']:.3f}"   # (None before the first profile)
    fig.suptitle(f"DSV step {record['step']}: stage {s['stage']}, {s['sparse_layers']}/{s['layers']} layers sparse "
                 f"(* = sparse now), recall {recall}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="JSON-lines metrics log (megatron_dsv.layers.append_jsonl)")
    parser.add_argument("--out", default="dsv_profile.png")
    parser.add_argument("--step", type=int, default=None, help="record of this step (default: last)")
    args = parser.parse_args(argv)
    out = args.out if os.path.splitext(args.out)[1] else args.out + ".png"   # (what matplotlib would write)
    try:
        record = load_record(args.log, args.step)
    except (OSError, ValueError) as e:
        raise SystemExit(f"megatron_dsv.plot: {e}") from e
    plot(record, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
