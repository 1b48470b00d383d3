"""Pretrain the example video DiT with DSV sparse self-attention (or dense with --dense).

    python examples/pretrain_video_dit.py                 # tiny model, CPU: ~5.5 min, stage 1 -> stage 2
    python examples/pretrain_video_dit.py --dense         # the dense baseline, same seed and data
    python examples/pretrain_video_dit.py --model small --train-iters 2000   # GPU, bf16
    python examples/pretrain_video_dit.py --data images   # camera over photos (needs scikit-image)
    python examples/pretrain_video_dit.py --data folder --data-path ~/videos   # your files (needs PyAV)

One progress line every --log-interval steps: loss, DSV stage, layers running sparse, mean
profiled block sparsity, predictor recall (share of true attention mass the selected blocks
hold, on sampled rows), predictor loss, tokens/s and ETA (from the current stage's steps; in stage 1
it says it assumes stage-1 speed, and by which step stage 2 begins); on a
terminal a progress bar (tqdm) runs below the lines. Every --dsv-* flag of
megatron_dsv.config.add_dsv_args is accepted; DSVConfig.from_args builds the config.
For the tiny preset the script sets shorter stage-1 defaults than DSVConfig's (see
TINY_DSV_DEFAULTS) so the demo reaches stage 2 within a minute; flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings

import torch

# Megatron-Core warns at import that Transformer Engine and Apex are missing and it falls back to
# its local implementations; the example needs neither, so the warnings tell its user nothing.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
# Megatron-Core 0.16 warns about its own default cuda_graph_scope when a TransformerConfig is built.
warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from video_dit import PRESETS, MovingShapes, build_video_dit, flow_matching_loss, init_single_process  # noqa: E402
from video_dit.flow import flow_matching_loss_packed, sample_times  # noqa: E402
from video_dit.precision import MasterWeights  # noqa: E402
from video_dit.step_graph import CapturedTrainStep  # noqa: E402

from megatron_dsv import DSVConfig  # noqa: E402
from megatron_dsv.config import add_dsv_args  # noqa: E402
from megatron_dsv.layers import append_jsonl, dsv_layers, dsv_metrics, log_dsv_metrics  # noqa: E402
from megatron_dsv.layers.graphed import MAX_ELEMENTS as GRAPHED_MAX_ELEMENTS  # noqa: E402

# The tiny CPU demo: 2048 tokens (grid 8x16x16), cubes 2x4x4 = 32-token query blocks and
# 32-token KV blocks (64 of each), a short stage 1.
TINY_DSV_DEFAULTS = dict(
    dsv_block_q=32, dsv_block_kv=32, dsv_cube=[2, 4, 4], dsv_sample_stride=16,
    dsv_stage1_min_steps=30, dsv_stage1_max_steps=50, dsv_loss_threshold=0.05,
    dsv_profile_interval_stage1=4, dsv_profile_interval_stage2=10, dsv_layer_sparsity_threshold=0.3,
    dsv_predictor_lr=1e-2,
)
TINY_DEFAULTS = dict(train_iters=100, lr=1e-3, micro_batch_size=2, eval_interval=50)
STAGE1_SHARE = 0.4


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="size preset")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--latent-shape", type=int, nargs=3, metavar=("T", "H", "W"))
    g.add_argument("--latent-channels", type=int)
    g.add_argument("--patch-size", type=int, nargs=3, metavar=("PT", "PH", "PW"))
    g.add_argument("--text-len", type=int, help="caption tokens for cross-attention (0: none)")
    g.add_argument("--dense", action="store_true",
                   help="dense SDPA self-attention baseline (default: DSV; --dsv is accepted and changes nothing)")
    g = parser.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=1000,
                   help="length of the run (and of the lr schedule); for the GPU presets stage 1 takes at most "
                   "40%% of it unless --dsv-stage1-max-steps is given")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop after this step (checkpointing it with --save); resume with --load")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--pack", action="store_true",
                   help="pack each micro-batch's clips, of mixed latent shapes, into one sequence (THD-style "
                        "packed_seq_params); validation stays on the fixed shape")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--lr-warmup-iters", type=int, default=10)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0, help="largest gradient norm (0: no clipping)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--data", default="shapes", choices=["shapes", "images", "folder"],
                   help="moving shapes; camera pans/zooms over scikit-image's photos with sprites; or clips of "
                   "the video files under --data-path (PyAV)")
    g.add_argument("--data-path", default=None, help="folder of video files for --data folder")
    g.add_argument("--val-data-path", default=None,
                   help="held-out folder for --data folder (default: other clips of --data-path's files)")
    g.add_argument("--frame-stride", type=int, default=1, help="--data folder: take every n-th frame")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--bf16", action="store_true", help="bf16 weights + fp32 master weights on CPU too")
    g.add_argument("--fp32", action="store_true", help="train in fp32 on GPU too (default there: bf16 weights, "
                   "fp32 master weights)")
    g.add_argument("--no-fusion", action="store_true",
                   help="run the layers' elementwise tails eagerly on GPU too (default there: compiled by "
                   "torch.compile)")
    g.add_argument("--recompute-activations", action="store_true",
                   help="full activation recomputation of every layer (GPU only)")
    g.add_argument("--cuda-graph-step", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each training step's forward + backward from a CUDA graph, captured once the "
                   "step's shapes and DSV decisions repeat (two held: a plain step's and a profile step's); removes "
                   "the host time that bounds small models: `small` at 16k tokens steps 2.0x faster in DSV's "
                   "stage 2, 1.03x dense (bench/step.py). Default: on with a GPU for micro-batches of at most 2^25 "
                   "activation elements (tokens x batch x hidden; `small` at 16k x 2 is 2^24), except with --pack "
                   "or --recompute-activations, which it excludes")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--eval-interval", type=int, default=200)
    g.add_argument("--eval-iters", type=int, default=2, help="held-out batches per validation")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--dsv-log", default=None,
                   help="JSON-lines file of per-layer, per-head DSV metrics (every --log-interval steps)")
    g.add_argument("--log-json", default=None, help="JSON-lines file of the progress records")
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="directory to save checkpoints to")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None, help="directory to resume from (latest checkpoint)")
    add_dsv_args(parser)

    # The preset's defaults are set before the full parse, so --help shows them too.
    pre, _ = parser.parse_known_args([a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-h", "--help")])
    if pre.model == "tiny":
        parser.set_defaults(**TINY_DSV_DEFAULTS, **TINY_DEFAULTS)
    else:
        # Stage 1 takes at most STAGE1_SHARE of a run (the library's cap, 1000 steps, is for long runs):
        # the setting of the quality runs in the README (a 1000-step run, stage 1 capped at 400).
        cap = max(pre.dsv_stage1_min_steps, int(STAGE1_SHARE * pre.train_iters))
        parser.set_defaults(dsv_stage1_max_steps=min(pre.dsv_stage1_max_steps, cap))
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args) -> None:
    """Usage errors for values the run could only fail on later (after minutes of set-up or training)."""
    for name in ("train_iters", "micro_batch_size", "log_interval", "eval_interval", "eval_iters", "exit_interval",
                 "save_interval", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not (math.isfinite(args.clip_grad) and args.clip_grad >= 0):
        parser.error(f"--clip-grad must be a finite number, at least 0 (0: no clipping), got {args.clip_grad}")
    if args.save_interval is not None and not args.save:
        parser.error("--save-interval needs --save, the directory to save to")
    if args.save and os.path.exists(args.save) and not os.path.isdir(args.save):
        parser.error(f"--save {args.save}: exists and is not a directory")
    for flag, path in (("--log-json", args.log_json), ("--dsv-log", args.dsv_log)):
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            parser.error(f"{flag} {path}: is a directory, or its directory does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.dense and args.dsv:
        parser.error("--dense and --dsv exclude each other (DSV is this script's default)")
    if args.bf16 and args.fp32:
        parser.error("--bf16 and --fp32 exclude each other")
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    if args.cuda_graph_step and not on_gpu:
        parser.error("--cuda-graph-step needs a GPU")
    if args.cuda_graph_step and (args.pack or args.recompute_activations):
        parser.error("--cuda-graph-step captures fixed shapes without activation recomputation: it excludes "
                     "--pack and --recompute-activations")
    if args.data == "folder" and not args.data_path:
        parser.error("--data folder needs --data-path")
    try:
        dit = dit_config(args)
        if not args.dense:
            DSVConfig.from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.cuda_graph_step is None:
        # On by default where a step is bound by host time: micro-batches up to the size up to which the
        # DSV layers graph their own attention (16k tokens x batch 2 x hidden 512 for `small`). Longer
        # steps are bound by the GPU, and a held graph's memory would only add to an eager step's peak.
        args.cuda_graph_step = (on_gpu and not (args.pack or args.recompute_activations)
                                and args.micro_batch_size * dit.num_tokens * dit.hidden_size <= GRAPHED_MAX_ELEMENTS)


def dit_config(args):
    dit = PRESETS[args.model]
    overrides = {
        "num_layers": args.num_layers, "hidden_size": args.hidden_size, "num_heads": args.num_attention_heads,
        "latent_shape": tuple(args.latent_shape) if args.latent_shape else None,
        "latent_channels": args.latent_channels, "text_len": args.text_len,
        "patch": tuple(args.patch_size) if args.patch_size else None,
    }
    return dit.replace(**{k: v for k, v in overrides.items() if v is not None})


def make_datasets(args, dit):
    """(train, held-out validation) datasets; validation uses another seed (other clips)."""
    shape, channels, val_seed = dit.latent_shape, dit.latent_channels, args.seed + 1_000_000
    if args.data == "folder":
        from video_dit.data_folder import VideoFolder

        kw = dict(frame_stride=args.frame_stride, num_captions=dit.num_captions)
        return (VideoFolder(args.data_path, channels, shape, seed=args.seed, **kw),
                VideoFolder(args.val_data_path or args.data_path, channels, shape, seed=val_seed, **kw))
    dataset = generated_dataset(args.data)
    return dataset(channels, shape, seed=args.seed), dataset(channels, shape, seed=val_seed)


def generated_dataset(data: str):
    """The dataset class of a built-in --data choice (procedural shapes, or camera moves over photos)."""
    if data == "images":
        from video_dit.data_images import CameraOverImages

        return CameraOverImages
    return MovingShapes


def pack_shapes(shape, patch):
    """Latent shapes mixed by --pack: the configured one, half as long, half the size, a quarter of it."""
    T, H, W = shape
    candidates = [(T, H, W), (T // 2, H, W), (T, H // 2, W // 2), (T // 2, H // 2, W)]
    return [c for c in candidates if all(n >= p and n % p == 0 for n, p in zip(c, patch))]


class PackedBatches:
    """--pack data: clip i of the run has the i-th of the mixed shapes (cycling), drawn from the
    training dataset of that shape; a batch is a list of latents [C, T, H, W] and caption ids."""

    def __init__(self, args, dit):
        self.shapes = pack_shapes(dit.latent_shape, dit.patch)
        if args.data not in ("shapes", "images"):
            raise ValueError("--pack works with --data shapes or images")
        dataset = generated_dataset(args.data)
        self.data = [dataset(dit.latent_channels, shape, seed=args.seed + i) for i, shape in enumerate(self.shapes)]

    def batch(self, start: int, size: int):
        items = [self.data[(start + i) % len(self.data)][start + i] for i in range(size)]
        return [v for v, _ in items], torch.tensor([c for _, c in items], dtype=torch.int64)


def lr_at(args, step):
    warm = min(1.0, (step + 1) / max(1, args.lr_warmup_iters))
    decay = 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, args.train_iters))))
    return args.lr * warm * (0.1 + 0.9 * decay)


def _fmt_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


@torch.no_grad()
def validate(model, val_data, args, device) -> list:
    """Flow-matching loss of each held-out batch, with fixed times and noise: batch i is the same for
    every --eval-iters above i, so a run with more batches also gives a shorter run's mean."""
    model.eval()
    g = torch.Generator().manual_seed(args.seed + 7)
    losses = []
    for i in range(args.eval_iters):
        x, cap = val_data.batch(i * args.micro_batch_size, args.micro_batch_size)
        t = torch.linspace(0.1, 0.9, x.shape[0])
        noise = torch.randn(x.shape, generator=g)
        losses.append(float(flow_matching_loss(model, x.to(device), cap.to(device), t=t.to(device),
                                               noise=noise.to(device))))
    model.train()
    return losses


def save_checkpoint(path, model, opt, master, step, args):
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f"iter_{step:07d}.pt.tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "master": master.state_dict() if master else None,
                "args": vars(args), "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, tmp[:-4])
    with open(os.path.join(path, "latest"), "w") as f:
        f.write(str(step))


# Saved arguments that must match for a checkpoint to load into this run (the model's own sizes are
# compared as the preset and the flags resolve them: dit_config).
MODEL_ARGS = ("dense", "dsv_rank", "dsv_block_q", "dsv_block_kv", "dsv_cube", "dsv_estimator")


def load_checkpoint(path, model, opt, master=None, args=None):
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        raise SystemExit(f"--load {path}: no checkpoint there ({latest} is missing; --save writes it)")
    with open(latest) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise SystemExit(f"--load {path}: {latest} should hold the step of the last checkpoint, it holds {text[:40]!r}")
    step = int(text)
    file = os.path.join(path, f"iter_{step:07d}.pt")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise SystemExit(f"--load {path}: cannot read {file} ({type(e).__name__}: {e})") from e
    if args is not None:
        saved = state.get("args", {})
        differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} there, {getattr(args, k)!r} here"
                  for k in MODEL_ARGS if k in saved and saved[k] != getattr(args, k)]
        here = dit_config(args)
        try:
            there = dit_config(argparse.Namespace(**{**vars(args), **saved}))
        except (KeyError, ValueError):   # arguments of another version of this script
            there = here
        differ += [f"{f.name} {getattr(there, f.name)!r} there, {getattr(here, f.name)!r} here"
                   for f in dataclasses.fields(here) if getattr(there, f.name) != getattr(here, f.name)]
        if differ:
            raise SystemExit(f"--load {path}: {file} was saved by a run with another model: " + "; ".join(differ))
    if master is None and state.get("master") is not None:
        raise SystemExit(f"--load {path}: {file} was saved by a bf16 run (with fp32 master weights); resume it "
                         f"with --bf16 on a GPU")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if master is not None:
        if state.get("master") is None:
            raise SystemExit(f"--load {path}: {file} was saved by a run with fp32 weights (no fp32 master copy); "
                             f"resume it with --fp32")
        master.load_state_dict(state["master"])
    torch.set_rng_state(state["torch_rng"])
    return step


def progress_bar(start: int, end: int):
    """A tqdm bar on a terminal (the progress lines are written above it); None when the output is not
    a terminal (logs, pipes: plain lines only) or tqdm is not installed."""
    if not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=end, initial=start, unit="step", dynamic_ncols=True)


def progress_line(step, args, loss, summary, tok_s, step_s, eta, val=None, eta_note=""):
    parts = [f"step {step:5d}/{args.train_iters}", f"loss {loss:.4f}"]
    if summary is not None:
        parts += [f"stage {summary['stage']}", f"sparse layers {summary['sparse_layers']}/{summary['layers']}",
                  f"sparsity {summary['block_sparsity']:.3f}", f"recall {summary['recall']:.3f}",
                  f"pred-loss {summary['predictor_loss']:.3f}"]
    else:
        parts.append("dense")
    parts += [f"{tok_s:,.0f} tok/s", f"{step_s:.2f} s/step", f"ETA {_fmt_time(eta)}{eta_note}"]
    if val is not None:
        parts.append(f"val {val:.4f}")
    return " | ".join(parts)


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    if args.recompute_activations and device.type != "cuda":
        raise ValueError("--recompute-activations needs a GPU (Megatron's checkpointing uses the CUDA RNG tracker)")
    bf16 = args.bf16 or (device.type == "cuda" and not args.fp32)
    init_single_process(device, args.seed)

    dit = dit_config(args)
    dsv_cfg = None if args.dense else DSVConfig.from_args(args)
    torch.manual_seed(args.seed)
    model = build_video_dit(dit, dsv_config=dsv_cfg, bf16=bf16, recompute=args.recompute_activations,
                            cube=None if dsv_cfg else tuple(args.dsv_cube),
                            fused=device.type == "cuda" and not args.no_fusion).to(device)
    master = MasterWeights(model) if bf16 else None
    params = master.master if master else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    captured = CapturedTrainStep(model, master.params if master else params) if args.cuda_graph_step else None
    dsv = dsv_layers(model)   # found once: the metrics are read every step

    start = load_checkpoint(args.load, model, opt, master, args) if args.load else 0
    train_data, val_data = make_datasets(args, dit)
    if args.pack:
        train_data = PackedBatches(args, dit)
    writer = None
    if args.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        writer = SummaryWriter(args.tensorboard_dir)

    n_params = sum(p.numel() for p in params)
    print(f"model {args.model}: {dit.num_layers} layers, hidden {dit.hidden_size}, {dit.num_heads} heads x "
          f"{dit.head_dim}, {n_params / 1e6:.1f}M params, latent {dit.latent_channels}x{dit.latent_shape}, "
          f"{dit.num_tokens} tokens/clip (grid {dit.grid}), batch {args.micro_batch_size}, device {device}"
          f"{' bf16' if bf16 else ''}, attention {'dense SDPA' if args.dense else 'DSV'}", flush=True)
    if dsv_cfg:
        print(f"DSV: cube {dsv_cfg.cube}, block_q {dsv_cfg.block_q}, block_kv {dsv_cfg.block_kv}, rank "
              f"{dsv_cfg.rank}, stage 1 {dsv_cfg.stage1_min_steps}-{dsv_cfg.stage1_max_steps} steps, "
              f"{policy_text(dsv_cfg)}", flush=True)

    model.train()
    t_start = time.time()
    step_times = []
    train_s = 0.0   # training steps' time so far (validation and checkpoints left out)
    end = min(args.train_iters, args.exit_interval or args.train_iters)
    if dsv_cfg and end <= dsv_cfg.stage1_min_steps:   # (stage 2 starts after that many steps)
        print(f"note: the run ends at step {end}, before stage 2 can start (stage 1 takes at least "
              f"{dsv_cfg.stage1_min_steps} steps, --dsv-stage1-min-steps): every step runs dense", flush=True)
    if args.load:
        print(f"resuming from step {start} of {args.load}" + ("" if start < end else
              f"; nothing to train: the run ends at step {end} (--train-iters / --exit-interval)"), flush=True)
    bar = progress_bar(start, end)
    for step in range(start, end):
        t0 = time.time()
        x, cap = train_data.batch(step * args.micro_batch_size, args.micro_batch_size)
        cap = cap.to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        # Times and noise from a per-step generator: a resumed run draws what an uninterrupted one would.
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        if args.pack:
            x = [clip.to(device) for clip in x]
            loss = flow_matching_loss_packed(model, x, cap, generator=gen)
            step_tokens = sum(math.prod(n // p for n, p in zip(clip.shape[1:], dit.patch)) for clip in x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        else:
            x = x.to(device)
            t = sample_times(x.shape[0], gen, device)
            noise = torch.randn(x.shape, generator=gen).to(device)
            step_tokens = args.micro_batch_size * dit.num_tokens
            opt.zero_grad(set_to_none=True)
            if captured is not None:
                loss = captured(x, cap, t, noise)
            else:
                loss = flow_matching_loss(model, x, cap, t=t, noise=noise)
                loss.backward()
        if master:
            master.grads_to_master()
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        opt.step()
        if master:
            master.master_to_params()
        # Read while the device still runs the step: after the sync below the read's host time (~0.4 ms for
        # 8 layers) would add to the step (bench/step.py). It waits only for the forward's timing events
        # and, at a profile step, for the profile's copy to the host (the step's end).
        metrics = dsv_metrics(dsv) if dsv_cfg else None
        loss_value = float(loss.detach())  # syncs the device
        step_s = time.time() - t0
        done = step + 1
        stage = metrics["summary"]["stage"] if metrics else 0
        step_times.append((step_s, step_tokens, stage))
        train_s += step_s
        val = val_losses = None
        if done % args.eval_interval == 0 or done == args.train_iters:
            val_losses = validate(model, val_data, args, device)
            val = sum(val_losses) / len(val_losses)
            if dsv_cfg:
                dsv_metrics(dsv)  # drop validation's forward timings from the next step's
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {loss_value:.4f}" + (f", stage {stage}" if stage else ""))
        if done % args.log_interval == 0 or val is not None:
            # Rates and ETA from the last steps of the current stage only: stage-2 steps cost what
            # stage-1 steps do not, so a window across the switch would be wrong for both.
            recent = [(t, n) for t, n, st in step_times[-10:] if st == stage]
            mean_s = sum(t for t, _ in recent) / len(recent)
            tok_s = sum(n for _, n in recent) / sum(t for t, _ in recent)
            summary = metrics["summary"] if metrics else None
            # In stage 1 the rate of stage 2 is not known yet: the ETA says which stage's rate it assumes.
            switch = dsv_cfg.stage1_max_steps if dsv_cfg else end
            note = f" at stage-1 speed, stage 2 by step {switch}" if stage == 1 and switch < end else ""
            line = progress_line(done, args, loss_value, summary, tok_s, step_s, mean_s * (end - done), val, note)
            if bar is not None:
                bar.write(line)
            else:
                print(line, flush=True)
            if args.log_json:
                with open(args.log_json, "a") as f:
                    f.write(json.dumps({"step": done, "loss": loss_value, "val_loss": val, "val_losses": val_losses,
                                        "step_s": step_s, "train_s": train_s, "tokens_per_s": tok_s, "dsv": summary}) + "\n")
        if writer is not None:
            writer.add_scalar("train/loss", loss_value, done)
            writer.add_scalar("train/step_time_s", step_s, done)
            if val is not None:
                writer.add_scalar("val/loss", val, done)
            if metrics:
                log_dsv_metrics(metrics, writer, done)
        if metrics and args.dsv_log and (done % args.log_interval == 0 or val is not None):
            append_jsonl(args.dsv_log, metrics, done)
        if args.save and args.save_interval and done % args.save_interval == 0:
            save_checkpoint(args.save, model, opt, master, done, args)
    if bar is not None:
        bar.close()
    if args.save and start < end:
        save_checkpoint(args.save, model, opt, master, end, args)
    if writer is not None:
        writer.close()
    if dsv_cfg and start < end:  # the last training step's metrics (timings: its forward)
        for layer in metrics["layers"]:
            print(f"layer {layer['layer']}: stage {layer['stage']}, {'sparse' if layer['sparse'] else 'dense'}, "
                  f"block sparsity {_fmt_list(layer['block_sparsity'])} "
                  f"(oracle {_fmt_list(layer['oracle_block_sparsity'])}), budget {_fmt_list(layer['budget'])}, "
                  f"held mass {_fmt_list(layer['held_mass'])}, recall {_fmt_list(layer['recall'])}, "
                  f"predictor loss {layer['predictor_loss']:.3f}, "
                  f"forward ms: selection {layer.get('selection_ms', 0.0):.1f}, "
                  f"attention {layer.get('attention_ms', 0.0):.1f}", flush=True)
        print(closing_summary(dsv_cfg, metrics), flush=True)
    replays = f" ({captured.replays} replayed from CUDA graphs)" if captured is not None else ""
    print(f"done: {max(0, end - start)} steps in {_fmt_time(time.time() - t_start)}{replays}", flush=True)


def policy_text(cfg) -> str:
    if cfg.budget_policy == "theta":
        return (f"budget policy theta (heads keep {cfg.theta} of the mass; layer sparsity threshold "
                f"{cfg.layer_sparsity_threshold})")
    spread = "spread by mass curves" if cfg.budget_policy == "target" else "uniform over heads"
    return (f"budget policy {cfg.budget_policy} (density {cfg.target_density} {spread}, annealed over "
            f"{cfg.anneal_steps} steps), dispatch {cfg.dispatch}")


def closing_summary(cfg, metrics) -> str:
    """Which layers ran sparse, at what density, the measured attention speed against dense, the policy."""
    layers = metrics["layers"]
    sparse = [l["layer"] for l in layers if l["sparse"]]
    text = (f"DSV summary: {policy_text(cfg)}; {len(sparse)}/{len(layers)} layers ran sparse"
            + (f" (layers {', '.join(map(str, sparse))})" if sparse else "")
            + f", attended density {metrics['summary']['density']:.3f} of the blocks")
    costs = [l["attention_cost"] for l in layers if l["attention_cost"]]
    if costs:
        dense_ms, sparse_ms = costs[-1]["dense_ms"], costs[-1]["sparse_ms"]
        text += (f"; attention fwd+bwd measured at this shape: dense {dense_ms:.2f} ms, sparse {sparse_ms:.2f} ms "
                 f"({dense_ms / sparse_ms:.2f}x)")
    else:
        text += "; attention speed not measured here (density rule: CPU, or context parallel)"
    return text


def _fmt_list(values):
    return "[" + " ".join(f"{v:.2f}" for v in values) + "]"


if __name__ == "__main__":
    main()
