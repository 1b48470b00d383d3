"""End-to-end DiT training-step benchmark on one GPU: dense (cuDNN SDPA / TE) vs DSV stage 2.

The model is examples/video_dit at the DSV paper's 2.7B layer shape (hidden 2048, 16
heads x 128, text cross-attention) with as many layers as --num-layers says; one step is
forward + backward + AdamW update with bf16 weights and fp32 master weights, micro-batch 1. For each token
count it measures, in one process:

  dense         SDPADotProductAttention (megatron_dsv.ops.dense_attention: TE if
                importable, else torch SDPA with cuDNN first)
  dsv@learned   DSV in stage 2 with the per-layer, per-head budgets (shares of the KV blocks) a
                training run ended with: the last record of a DSV log (--budgets-from, the
                JSON-lines file of --dsv-log; layers and heads reused cyclically); a layer that
                ran dense there runs dense here
  dsv@0.90/0.95 DSV in stage 2 with every head at that block sparsity

Every DSV mode dispatches as training does (DSVConfig's default dispatch: on the GPU, a layer
runs sparse only where selection + sparse attention measured faster than dense at its shape).

Per mode: step time (median of --iters after --warmup), tokens/s, peak memory, and the
share of the step spent in attention (core attention fwd+bwd timed alone on the same
shapes, times the layer count), in selection (DSV forward timer) and in predictor
upkeep (a step that profiles and fine-tunes the predictor minus a plain step, amortised
over profile_interval_stage2). Speedups are against the dense step of the same run.

    python bench/e2e.py --tokens 32768 65536 --num-layers 4 --json bench/results/e2e_h100.json
    python bench/e2e.py --smoke      # CPU, tiny shapes: checks the script, times nothing useful
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from video_dit import PRESETS, build_video_dit, flow_matching_loss, init_single_process  # noqa: E402
from video_dit.precision import MasterWeights  # noqa: E402

from megatron_dsv import DSVConfig  # noqa: E402
from megatron_dsv.layers import dsv_layers, dsv_metrics  # noqa: E402
from megatron_dsv.ops import dense as dense_ops  # noqa: E402
from traces import trace_to  # noqa: E402


def latent_for_tokens(tokens: int, patch=(1, 2, 2)):
    """A latent (T, H, W) whose token grid (T, H/2, W/2) holds `tokens` tokens, with square frames."""
    for t in (16, 8, 32, 4, 64):  # prefer video-like grids: 32k -> 8x64x64, 64k -> 16x64x64
        side = math.isqrt(tokens // t)
        if side * side * t == tokens and side % 4 == 0:
            return (t * patch[0], side * patch[1], side * patch[2])
    raise ValueError(f"no latent with square frames and a multiple-of-4 side gives {tokens} tokens")


def set_stage2(model, sparsity_per_layer):
    """Put every DSV layer in stage 2 with the given per-head block sparsity (list per layer),
    through the controllers' state dicts (so the host mirrors refresh), at a step that does not
    profile."""
    layers = dsv_layers(model)
    for i, layer in enumerate(layers):
        ctl = layer.controller
        state = ctl.state_dict()
        state["stage"].fill_(2)
        state["step"].fill_(1)
        sp = sparsity_per_layer[i % len(sparsity_per_layer)]
        sp = [sp[h % len(sp)] for h in range(ctl.heads)]  # a log of a model with other head counts
        state["block_sparsity"].copy_(torch.tensor(sp, dtype=state["block_sparsity"].dtype))
        ctl.load_state_dict(state)
    return layers


def learned_sparsity(path):
    """Per layer, per head: 1 - the budget the run's last record used (0 for a layer that ran dense)."""
    last = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][-1]
    return [[1.0 - b for b in layer["budget"]] if layer["sparse"] else [0.0] * len(layer["budget"])
            for layer in last["layers"]]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, opt, master, batch, device, iters):
    """Median ms of `iters` training steps."""
    x, cap, t, noise = batch
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        loss = flow_matching_loss(model, x, cap, t=t, noise=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if master:
            master.grads_to_master()
        opt.step()
        if master:
            master.master_to_params()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_core_attention(layer, s, heads, d, device, dtype, warmup, iters):
    """fwd+bwd of one core attention on random q, k, v [s, 1, heads, d] (no training side effects
    beyond what a step does: the DSV bookkeeping runs in backward as in training)."""
    q, k, v = (torch.randn(s, 1, heads, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(s, 1, heads * d, device=device, dtype=dtype)
    times = []
    for i in range(warmup + iters):
        sync(device)
        t0 = time.perf_counter()
        layer(q, k, v, None).backward(grad)
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_mode(name, dit, dsv_cfg, sparsity, args, device, batch):
    torch.manual_seed(0)
    bf16 = device.type == "cuda"
    model = build_video_dit(dit, dsv_config=dsv_cfg, bf16=bf16, fused=bf16 and not args.no_fusion,
                            cube=dsv_cfg.cube if dsv_cfg else tuple(args.cube)).to(device)
    master = MasterWeights(model) if bf16 else None  # bf16 weights, fp32 masters, as in training
    opt = torch.optim.AdamW(master.master if master else [p for p in model.parameters() if p.requires_grad],
                            lr=1e-5)
    layers = set_stage2(model, sparsity) if dsv_cfg else []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    time_steps(model, opt, master, batch, device, args.warmup)  # compiles, autotunes, allocates
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dsv_metrics(model)  # drop the warmup's forward timings
    step_ms = time_steps(model, opt, master, batch, device, args.iters)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    rec = {"mode": name, "step_ms": step_ms, "tokens_per_s": dit.num_tokens / (step_ms * 1e-3), "peak_gib": peak}
    if layers:
        m = dsv_metrics(model)
        steps = args.iters
        rec["sparse_layers"] = m["summary"]["sparse_layers"]
        # Share of the (query, key) blocks attended, averaged over layers; a layer running dense counts 1.
        rec["density"] = statistics.mean(statistics.mean(l["budget"]) if l["sparse"] else 1.0 for l in m["layers"])
        rec["selection_ms"] = m["summary"]["selection_ms"] / steps
        rec["attention_fwd_ms"] = m["summary"]["attention_ms"] / steps
        # Predictor upkeep: a step that profiles + fine-tunes (step % interval == 0) minus a plain one,
        # at the same budgets (a profile records new sparsities, so they are set again before each).
        upkeep = []
        for i in range(3):  # the first two may compile (the second profile's budgets follow the first's curves)
            for layer in set_stage2(model, sparsity):
                state = layer.controller.state_dict()
                state["step"].fill_(0)
                layer.controller.load_state_dict(state)
            with trace_to(args.trace if i == 2 else None, f"{name.replace('@', '_')}_{dit.num_tokens}_profile_step", device):
                upkeep.append(time_steps(model, opt, master, batch, device, 1) - step_ms)
        upkeep_ms = upkeep[-1]
        rec["predictor_upkeep_ms_per_profile"] = upkeep_ms
        rec["predictor_upkeep_each_ms"] = upkeep
        rec["predictor_ms_amortised"] = max(0.0, upkeep_ms) / dsv_cfg.profile_interval_stage2
        set_stage2(model, sparsity)
    core = model.decoder.layers[0].self_attention.core_attention
    dtype = torch.bfloat16 if bf16 else torch.float32
    attn_ms = time_core_attention(core, dit.num_tokens, dit.num_heads, dit.head_dim, device, dtype,
                                  args.warmup, args.iters)
    rec["attention_ms_per_layer"] = attn_ms
    rec["attention_share"] = attn_ms * dit.num_layers / step_ms
    if layers:
        rec["selection_share"] = rec["selection_ms"] / step_ms
        rec["predictor_share"] = rec["predictor_ms_amortised"] / step_ms
    del model, opt
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--model", default="dsv-2.7b", choices=sorted(PRESETS))
    p.add_argument("--sparsity", type=float, nargs="*", default=[0.90, 0.95])
    p.add_argument("--budgets-from", default=None, help="JSON-lines DSV log (--dsv-log of a training run)")
    p.add_argument("--block-q", type=int, default=64)
    p.add_argument("--block-kv", type=int, default=64)
    p.add_argument("--cube", type=int, nargs=3, default=[4, 4, 4])
    p.add_argument("--profile-interval", type=int, default=50, help="DSV profile_interval_stage2")
    p.add_argument("--no-fusion", action="store_true",
                   help="eager elementwise tails (default on GPU: compiled by torch.compile)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--trace", default=None, help="folder for torch.profiler tables of each DSV mode's profile step")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model and tokens: checks the script only")
    args = p.parse_args()

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench/e2e.py needs a GPU (use --smoke to check the script on CPU)")
    if args.smoke:
        args.model, args.tokens, args.num_layers, args.warmup, args.iters = "tiny", [1024], 2, 1, 2
        args.block_q, args.block_kv, args.cube = 32, 32, [2, 4, 4]
    init_single_process(device)
    base = PRESETS[args.model].replace(num_layers=args.num_layers)
    learned = learned_sparsity(args.budgets_from) if args.budgets_from else None

    results = []
    for tokens in args.tokens:
        dit = base.replace(latent_shape=latent_for_tokens(tokens, base.patch))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, dit.latent_channels, *dit.latent_shape, generator=g).to(device)
        batch = (x, torch.zeros(1, dtype=torch.int64, device=device), torch.full((1,), 0.5, device=device),
                 torch.randn(x.shape, generator=g).to(device))
        # Budgets from block sparsities (the theta rule's k = ceil((1 - s) n_kv)), no floor, every layer
        # allowed to run sparse: the default dispatch then decides as in training.
        cfg = DSVConfig(block_q=args.block_q, block_kv=args.block_kv, cube=tuple(args.cube),
                        profile_interval_stage2=args.profile_interval, layer_sparsity_threshold=0.0,
                        budget_floor=0.0)
        modes = [("dense", None, None)]
        if learned:
            modes.append(("dsv@learned", cfg, learned))
        modes += [(f"dsv@{s:.2f}", cfg, [[s] * dit.num_heads]) for s in args.sparsity]
        dense_ms = None
        for name, mode_cfg, sparsity in modes:
            try:
                rec = run_mode(name, dit, mode_cfg, sparsity, args, device, batch)
            except torch.cuda.OutOfMemoryError as e:  # report and go on with the other modes
                rec = {"mode": name, "error": f"OOM: {e}"[:300]}
                torch.cuda.empty_cache()
            rec.update(tokens=dit.num_tokens, latent=list(dit.latent_shape), layers=dit.num_layers)
            if name == "dense" and "step_ms" in rec:
                dense_ms = rec["step_ms"]
            if dense_ms and "step_ms" in rec:
                rec["speedup_vs_dense"] = dense_ms / rec["step_ms"]
            results.append(rec)
            print(json.dumps(rec), flush=True)

    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    dense_impl = "transformer_engine" if dense_ops.te is not None else "torch SDPA (cuDNN first)"
    out = {"device": dev_name, "torch": torch.__version__, "dense_impl": dense_impl, "model": args.model,
           "hidden": base.hidden_size, "heads": base.num_heads, "head_dim": base.head_dim,
           "block_q": args.block_q, "block_kv": args.block_kv, "cube": args.cube,
           "fused_elementwise": device.type == "cuda" and not args.no_fusion, "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    precision = "bf16 (fp32 masters)" if device.type == "cuda" else "fp32"
    fusion = "fused" if out["fused_elementwise"] else "eager"
    print(f"\n{dev_name}; dense = {dense_impl}; {args.model} shape x {args.num_layers} layers, {precision}, "
          f"micro-batch 1, {fusion} elementwise tails")
    hdr = f"{'tokens':>7} {'mode':>12} {'step ms':>9} {'tok/s':>9} {'speedup':>8} {'peak GiB':>9} " \
          f"{'density':>8} {'attn %':>7} {'sel %':>6} {'pred %':>7}"
    print(hdr)
    for r in results:
        if "error" in r:
            print(f"{r['tokens']:>7} {r['mode']:>12}  {r['error'][:60]}")
            continue
        def fmt(v, f):
            return format(v, f) if v is not None else format("-", ">" + f.split(".")[0])

        print(f"{r['tokens']:>7} {r['mode']:>12} {r['step_ms']:>9.1f} {r['tokens_per_s']:>9.0f} "
              f"{fmt(r.get('speedup_vs_dense'), '8.2f')} {fmt(r.get('peak_gib'), '9.2f')} "
              f"{fmt(r.get('density'), '8.3f')} {100 * r['attention_share']:>7.1f} "
              f"{fmt(r.get('selection_share') and 100 * r['selection_share'], '6.1f')} "
              f"{fmt(r.get('predictor_share') and 100 * r['predictor_share'], '7.2f')}")


if __name__ == "__main__":
    main()
