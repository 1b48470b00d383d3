"""The predictor's training work of one layer per stage-1 step, replayed from a CUDA graph.

A stage-1 step of `small` at 16k tokens runs this work in every layer: the Gram matrix of the keys
(key_gram) and the loss and gradients of the sampled rows (LowRankPredictor.gram_loss), a few
dozen small ops. Replayed from the step's graph they cost little GPU time but one node each, which
the host launches every replay (bench/results/step_h200/s9). This times one layer's work as a graph
of its own, replayed back to back (host launch and GPU time together, as a step replays it),
against the same work compiled by torch.compile (its elementwise ops and reductions fused), with the
graph's kernel count for each. Prints a table; --json writes it with the device name.

    python bench/predictor_upkeep.py --json bench/results/predictor_upkeep_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import capture_graph  # noqa: E402
from megatron_dsv.layers.predictor import LowRankPredictor, key_gram  # noqa: E402


def upkeep(q_rows, k, wq, wk, scale):
    loss, grad_q, grad_k = LowRankPredictor.gram_loss(q_rows, key_gram(k), wq, wk, scale, 0.95)
    return loss, grad_q, grad_k


def graphed(fn, args, replays: int):
    """(ms per replay, kernels in the graph) of fn(*args) captured as one CUDA graph (the warm-up runs
    torch.compile's compilation outside the capture)."""
    graph = capture_graph(lambda: fn(*args))
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays, kernels


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rows", type=int, default=256, help="sampled rows per sequence (16k tokens, stride 64: 4 cubes of 64)")
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/predictor_upkeep.py needs a GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    s, b, h, d = args.tokens, args.batch, args.heads, args.head_dim
    k = torch.randn(s, b, h, d, device="cuda", generator=gen).bfloat16()
    q_rows = torch.randn(h, b, args.rows, d, device="cuda", generator=gen)
    wq, wk = (torch.randn(h, d, args.rank, device="cuda", generator=gen) / args.rank ** 0.5 for _ in range(2))
    inputs = (q_rows, k, wq, wk, d ** -0.5)
    eager_out = upkeep(*inputs)
    compiled = torch.compile(upkeep, fullgraph=True, dynamic=False)
    compiled_out = compiled(*inputs)
    error = max(float((a - c).abs().max() / a.abs().max()) for a, c in zip(eager_out, compiled_out))
    rows = []
    for name, fn in (("eager ops", upkeep), ("torch.compile", compiled)):
        ms, kernels = graphed(fn, inputs, args.replays)
        rows.append({"arm": name, "ms_per_layer": ms, "kernels": kernels})
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **vars(args),
              "max_relative_difference": error, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}; {s} tokens x {b}, {h} heads x {d}, rank {args.rank}, {args.rows} rows; "
          f"graph replays, {args.replays} back to back; compiled vs eager max rel. difference {error:.1e}")
    print(f"{'arm':>16} {'ms per layer':>13} {'kernels':>8} {'x eager':>8}")
    for r in rows:
        print(f"{r['arm']:>16} {r['ms_per_layer']:13.4f} {r['kernels']:8d} {rows[0]['ms_per_layer'] / r['ms_per_layer']:8.2f}")


if __name__ == "__main__":
    main()
