"""Where a training step's time goes: the example DiT's step, dense against DSV, part by part.

Builds the example model (default: `small`, 16k tokens, batch 2, bf16 weights with fp32 masters,
fused tails, as `examples/pretrain_video_dit.py` trains it) and times, with the device synchronised
around each part, what the example's training loop does every step:

  data      drawing the batch on the host and copying it to the device
  train     forward + backward + optimizer step + reading dsv_metrics(model), synchronised at the end
            (the example reads the metrics every step, while the device still runs the step); its part
            until the work is launched and the metrics read, before the wait for the loss, is reported
            as "host ms": an arm whose host ms is close to its train ms is bound by host time, not by the
            GPU. The read waits for the forward's timing events (eager steps; long done by then) and, at
            a profile step, for the profile's copy to the host, i.e. for the step's end: there host ms
            includes the device's time
  metrics   the time of the metrics read, within train

for these modes, in one process:

  dense         SDPADotProductAttention
  dsv-stage1    DSV in stage 1 (dense attention + predictor training every step)
  dsv-stage2    DSV in stage 2 at --density (uniform budgets), a step that does not profile
  dsv-profile   the same, at a step that profiles and fine-tunes the predictor
  dsv-stage1 profile   a stage-1 step that profiles (one in profile_interval_stage1)
  dsv-stage2, no CUDA graphs   dsv-stage2 with DSVConfig.cuda_graphs off (every launch from the host)
  dsv-stage1, no CUDA graphs   dsv-stage1 so (the predictor's training launched op by op)
  dense / dsv-stage1 / dsv-stage1 profile / dsv-stage2 / dsv-profile, step graph   with --step-graph:
                the step's forward + backward replayed from a CUDA graph (the example's --cuda-graph-step);
                the optimizer step (and the predictor's Adam step, the profile's EMAs) stays eager

DSV runs with DSVConfig's defaults (dispatch included: on the GPU a layer runs sparse only where
that measured faster at its shape), except that every head's budget is --density (the theta rule
fed that sparsity; under the default compute-target policy, the density it anneals to).

Step time and throughput count train (data is reported, not counted: see record), and
each stage's steps with its profile step amortised over DSVConfig's profile interval of that stage.
With --trace, torch.profiler tables (top host and device ops) of one step each of dense, stage 1,
plain stage 2 and profiling (stage 1 and stage 2), and with --step-graph of each of them graphed,
go to the --trace folder. Prints a table last; --json writes the numbers with the device name.

    python bench/step.py --json bench/results/step_small_h200.json --trace /tmp/trace
    python bench/step.py --smoke       # CPU, tiny shapes: checks the script only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from pretrain_video_dit import generated_dataset  # noqa: E402
from video_dit import PRESETS, build_video_dit, flow_matching_loss, init_single_process  # noqa: E402
from video_dit.flow import sample_times  # noqa: E402
from video_dit.precision import MasterWeights  # noqa: E402
from video_dit.step_graph import CapturedTrainStep  # noqa: E402

from megatron_dsv import DSVConfig  # noqa: E402
from megatron_dsv.layers import dsv_layers, dsv_metrics  # noqa: E402
from traces import trace_to  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def set_state(layers, *, stage: int, step: int, density=None):
    """Stage, step count and (stage 2) uniform per-head block sparsity 1 - density, via the
    controllers' state dicts so their host mirrors refresh. The mirrors are rebuilt here, before the
    timed step: rebuilding one reads the device (a sync per buffer), which a training run never
    does per step (this cost 126 syncs per stage-1 step in the arms up to 2026-11-30)."""
    for layer in layers:
        state = layer.controller.state_dict()
        state["stage"].fill_(stage)
        state["step"].fill_(step)
        if density is not None:
            state["block_sparsity"].fill_(1.0 - density)
        layer.controller.load_state_dict(state)
        layer.controller.host()


class Trainer:
    def __init__(self, dit, dsv_cfg, args, device, step_graph=False):
        torch.manual_seed(0)
        self.device, self.args, self.dit = device, args, dit
        bf16 = device.type == "cuda"
        self.model = build_video_dit(dit, dsv_config=dsv_cfg, bf16=bf16, fused=bf16,
                                     cube=dsv_cfg.cube if dsv_cfg else tuple(args.cube)).to(device)
        self.master = MasterWeights(self.model) if bf16 else None
        params = self.master.master if self.master else [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=1e-5)
        self.data = generated_dataset(args.data)(dit.latent_channels, dit.latent_shape, seed=0)
        self.layers = dsv_layers(self.model)
        self.captured = (CapturedTrainStep(self.model, self.master.params if self.master else params)
                         if step_graph else None)
        self.dsv, self.cfg = dsv_cfg is not None, dsv_cfg
        self.n = 0

    def step(self):
        """One step of the example's loop; returns (data, train, metrics read, host part of train) milliseconds."""
        dev, args = self.device, self.args
        sync(dev)
        t0 = time.perf_counter()
        x, cap = self.data.batch(self.n * args.micro_batch_size, args.micro_batch_size)
        x, cap = x.to(dev), cap.to(dev)
        gen = torch.Generator().manual_seed(self.n)
        t = sample_times(x.shape[0], gen, dev)
        noise = torch.randn(x.shape, generator=gen).to(dev)
        sync(dev)
        t1 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        if self.captured is not None:
            loss = self.captured(x, cap, t, noise)
        else:
            loss = flow_matching_loss(self.model, x, cap, t=t, noise=noise)
            loss.backward()
        if self.master:
            self.master.grads_to_master()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        if self.master:
            self.master.master_to_params()
        t_read = time.perf_counter()
        if self.dsv:
            dsv_metrics(self.layers)
        t_host = time.perf_counter()
        float(loss.detach())
        t2 = time.perf_counter()
        self.n += 1
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t_host - t_read) * 1e3, (t_host - t1) * 1e3

    def timed(self, iters, before=None):
        parts = []
        for _ in range(iters):
            if before:
                before()
            parts.append(self.step())
        return [statistics.median(p[i] for p in parts) for i in range(4)]


def record(mode, parts, tokens, **extra):
    """step ms = train (which holds the metrics read). The data part (drawing the batch on the host) is the same work in
    every arm and is left out: on a busy host its median moved between 8 and 217 ms from arm to arm
    in one run (2026-11-30, H200), more than the differences measured."""
    data, train, metrics, host = parts
    return {"mode": mode, "data_ms": data, "train_ms": train, "metrics_ms": metrics, "step_ms": train,
            "train_host_ms": host, "tokens_per_s": tokens / (train * 1e-3), **extra}


# The trace files of the step-graph arms.
TRACE_NAMES = {"dsv-stage1, step graph": "stage1_step_graph", "dsv-stage1 profile, step graph": "stage1_profile_step_graph",
               "dsv-stage2, step graph": "stage2_step_graph", "dsv-profile, step graph": "profile_step_graph"}


def trace(trainer, out: Path, before=None, name="dsv"):
    for i in range(3):  # two steps to settle, the third traced; before() stays out of the trace (its syncs)
        if before:
            before()
        with trace_to(out if i == 2 else None, name, trainer.device):
            trainer.step()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(PRESETS))
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--data", default="images", choices=["shapes", "images"])
    p.add_argument("--density", type=float, default=0.1, help="stage-2 budget (share of KV blocks) per head")
    p.add_argument("--cube", type=int, nargs=3, default=[4, 4, 4])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--trace", default=None, help="folder for torch.profiler tables of dense, stage-1 and stage-2 steps")
    p.add_argument("--step-graph", action="store_true",
                   help="also time dense and DSV (stage 1, stage 2 and their profile steps) with the step's forward "
                   "+ backward replayed from a CUDA graph (examples/video_dit/step_graph.py; the example's "
                   "--cuda-graph-step)")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script only")
    args = p.parse_args()

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench/step.py needs a GPU (use --smoke to check the script on CPU)")
    if device.type != "cuda" and args.step_graph:
        raise SystemExit("--step-graph needs a GPU")
    dit = PRESETS[args.model]
    cfg = DSVConfig()
    if args.smoke:
        args.model, args.warmup, args.iters, args.data = "tiny", 1, 2, "shapes"
        dit = PRESETS["tiny"].replace(latent_shape=(4, 16, 16))
        cfg = DSVConfig(block_q=32, block_kv=32, cube=(2, 4, 4))
        args.cube = list(cfg.cube)
    init_single_process(device)
    tokens = dit.num_tokens * args.micro_batch_size
    # Every head at the given budget: the theta rule fed block sparsity 1 - density, no layer threshold.
    # Stage 1 runs as in training (no state reload per step), kept there and free of profile steps by these
    # settings. The arms that reload the state before each step (profile steps, stage 2) do it before the
    # timed part: the reload reads the device to rebuild the host mirrors and restarts the copy of the
    # pending predictor loss (up to 2026-11-30 the reload dropped that copy, and the timed step's upkeep
    # then waited for the device: 17 ms more per graphed stage-1 profile step, 6 ms per stage-2 one,
    # bench/results/step_h200/s9/before_reload_fix.json against step_run1.json).
    forced = cfg.replace(budget_policy="theta", layer_sparsity_threshold=0.0, budget_floor=0.0,
                         loss_threshold=0.0, stage1_max_steps=1 << 40, profile_interval_stage1=1 << 30)
    interval = forced.profile_interval_stage2
    results = []

    dense = Trainer(dit, None, args, device)
    dense.timed(args.warmup)
    results.append(record("dense", dense.timed(args.iters), tokens))
    if args.trace:
        trace(dense, Path(args.trace), name="dense")
    del dense
    if args.step_graph:
        dense = Trainer(dit, None, args, device, step_graph=True)
        dense.timed(args.warmup)
        results.append(record("dense, step graph", dense.timed(args.iters), tokens))
        if args.trace:
            trace(dense, Path(args.trace), name="dense_step_graph")
        del dense

    dsv = Trainer(dit, forced, args, device)
    stage1 = lambda: set_state(dsv.layers, stage=1, step=1)  # noqa: E731 (step 1: trains, does not profile)
    plain = lambda: set_state(dsv.layers, stage=2, step=1, density=args.density)  # noqa: E731
    profiling = lambda: set_state(dsv.layers, stage=2, step=0, density=args.density)  # noqa: E731
    stage1_profiling = lambda: set_state(dsv.layers, stage=1, step=0)  # noqa: E731
    stage1()
    dsv.timed(args.warmup)
    results.append(record("dsv-stage1", dsv.timed(args.iters), tokens, density=args.density))
    for name, before in (("dsv-stage1 profile", stage1_profiling), ("dsv-stage2", plain), ("dsv-profile", profiling)):
        dsv.timed(args.warmup, before)
        results.append(record(name, dsv.timed(args.iters, before), tokens, density=args.density))
    eager = Trainer(dit, forced.replace(cuda_graphs=False), args, device)
    plain_eager = lambda: set_state(eager.layers, stage=2, step=1, density=args.density)  # noqa: E731
    eager.timed(args.warmup, plain_eager)
    results.insert(-1, record("dsv-stage2, no CUDA graphs", eager.timed(args.iters, plain_eager), tokens,
                              density=args.density))
    set_state(eager.layers, stage=1, step=1)   # then runs on in stage 1 without profiles, as dsv-stage1
    eager.timed(args.warmup)
    after = next(i for i, r in enumerate(results) if r["mode"] == "dsv-stage1") + 1
    results.insert(after, record("dsv-stage1, no CUDA graphs", eager.timed(args.iters), tokens, density=args.density))
    if args.trace:
        trace(dsv, Path(args.trace), plain)
        trace(dsv, Path(args.trace), profiling, name="profile")
        trace(dsv, Path(args.trace), stage1_profiling, name="stage1_profile")
        stage1()
        trace(dsv, Path(args.trace), name="stage1")
    del dsv, eager
    if args.step_graph:
        graphed = Trainer(dit, forced, args, device, step_graph=True)
        set_state(graphed.layers, stage=1, step=1)
        graphed.timed(1)   # no layer has run: no key yet
        # Stage 1 runs on from the state set above, as in training.
        arms = (("dsv-stage1, step graph", None),
                ("dsv-stage1 profile, step graph", lambda: set_state(graphed.layers, stage=1, step=0)),
                ("dsv-stage2, step graph", lambda: set_state(graphed.layers, stage=2, step=1, density=args.density)),
                ("dsv-profile, step graph", lambda: set_state(graphed.layers, stage=2, step=0, density=args.density)))
        for name, before in arms:   # each arm's key captures at its third step (STABLE_STEPS), within the warm-up
            graphed.timed(args.warmup, before)
            replays = graphed.captured.replays
            results.append(record(name, graphed.timed(args.iters, before), tokens, density=args.density,
                                  replays=graphed.captured.replays - replays))
            if args.trace:
                trace(graphed, Path(args.trace), before, name=TRACE_NAMES[name])
        del graphed
    # Whole runs profile every profile_interval_stage{1,2}-th step (the default policy's intervals).
    intervals = {1: cfg.profile_interval_stage1, 2: interval}
    for plain, prof_name, stage in (("dsv-stage1", "dsv-stage1 profile", 1), ("dsv-stage2", "dsv-profile", 2),
                                    ("dsv-stage1, step graph", "dsv-stage1 profile, step graph", 1),
                                    ("dsv-stage2, step graph", "dsv-profile, step graph", 2)):
        plain_r = next((r for r in results if r["mode"] == plain), None)
        prof = next((r for r in results if r["mode"] == prof_name), None)
        if plain_r is not None and prof is not None:
            every = intervals[stage]
            amortised = (plain_r["step_ms"] * (every - 1) + prof["step_ms"]) / every
            results.append({"mode": f"{plain} (1 profile in {every})", "step_ms": amortised,
                            "tokens_per_s": tokens / (amortised * 1e-3), "density": args.density})

    dense_tps = results[0]["tokens_per_s"]
    graphed_dense = next((r["tokens_per_s"] for r in results if r["mode"] == "dense, step graph"), None)
    for r in results:
        r["speedup_vs_dense"] = r["tokens_per_s"] / dense_tps
        if graphed_dense:
            r["speedup_vs_dense_step_graph"] = r["tokens_per_s"] / graphed_dense
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    out = {"device": name, "torch": torch.__version__, "model": args.model, "tokens_per_step": tokens,
           "micro_batch_size": args.micro_batch_size, "data": args.data, "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\n{name}; {args.model}, {dit.num_tokens} tokens x batch {args.micro_batch_size}; medians of {args.iters}")
    print(f"{'mode':>44} {'data ms':>8} {'train ms':>9} {'host ms':>8} {'metrics':>8} {'step ms':>8} {'tok/s':>9}"
          f" {'x dense':>8} {'x graphed dense':>15}")
    for r in results:
        f = (lambda k, fmt=".1f": f"{r[k]:{fmt}}" if k in r else "-")
        print(f"{r['mode']:>44} {f('data_ms'):>8} {f('train_ms'):>9} {f('train_host_ms'):>8} {f('metrics_ms'):>8} "
              f"{r['step_ms']:>8.1f} "
              f"{r['tokens_per_s']:>9.0f} {r['speedup_vs_dense']:>8.2f} {f('speedup_vs_dense_step_graph', '.2f'):>15}")


if __name__ == "__main__":
    main()
