"""The example video DiT (examples/video_dit) and the main job (examples/pretrain_video_dit.py)."""

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from video_dit import PRESETS, MovingShapes, build_video_dit, flow_matching_loss, patchify, unpatchify  # noqa: E402

from megatron_dsv import DSVConfig  # noqa: E402
from megatron_dsv.layers import DSVDotProductAttention, SDPADotProductAttention, dsv_layers  # noqa: E402
from megatron_dsv.layers.step_graph import replay_key  # noqa: E402

# 256 tokens (grid 4x8x8), cubes 2x4x4 = 32-token blocks: fast on CPU.
SMALL = PRESETS["tiny"].replace(latent_shape=(4, 16, 16))
DSV = DSVConfig(block_q=32, block_kv=32, cube=(2, 4, 4), sample_stride=8, stage1_min_steps=100,
                stage1_max_steps=200)


def _batch(dit, n=2, seed=0):
    x, cap = MovingShapes(dit.latent_channels, dit.latent_shape, seed=seed).batch(0, n)
    g = torch.Generator().manual_seed(seed)
    return x, cap, torch.rand(n, generator=g), torch.randn(x.shape, generator=g)


def _perturb(model, seed=0):
    """Give the zero-initialised adaLN/output layers weights, so every path affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("adaln" in name or "final_linear" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def test_patchify_round_trip():
    x = torch.randn(2, 3, 4, 6, 8)
    tok = patchify(x, (2, 2, 4))
    assert tok.shape == (2, 2 * 3 * 2, 3 * 2 * 2 * 4)
    assert torch.equal(unpatchify(tok, (2, 3, 2), (2, 2, 4), 3), x)
    # Token 1 (raster t=0, h=0, w=1) holds the patch starting at column 4.
    assert torch.equal(tok[0, 1].view(3, 2, 2, 4), x[0, :, 0:2, 0:2, 4:8])


def test_data_deterministic_per_seed():
    a, ca = MovingShapes(4, (4, 16, 16), seed=3).batch(5, 2)
    b, cb = MovingShapes(4, (4, 16, 16), seed=3).batch(5, 2)
    c, _ = MovingShapes(4, (4, 16, 16), seed=4).batch(5, 2)
    assert torch.equal(a, b) and torch.equal(ca, cb) and not torch.equal(a, c)
    assert a[:, :, 0].ne(a[:, :, -1]).any()  # the shapes move


def test_tiny_forward_backward(megatron_parallel):
    torch.manual_seed(0)
    model = build_video_dit(SMALL)
    _perturb(model)
    x, cap, t, noise = _batch(SMALL)
    out = model(x, t, cap)
    assert out.shape == x.shape and torch.isfinite(out).all()
    loss = flow_matching_loss(model, x, cap, t=t, noise=noise)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    attn = model.decoder.layers[0]
    w = attn.self_attention.linear_qkv.weight.view(SMALL.num_heads, 3, SMALL.head_dim, -1)
    assert SMALL.qk_tied_init and torch.equal(w[:, 0], w[:, 1]) and not torch.equal(w[:, 0], w[:, 2])
    assert float(attn.self_attention.q_layernorm.weight[0].detach()) == SMALL.qk_norm_init
    assert isinstance(attn.self_attention.core_attention, SDPADotProductAttention)
    assert isinstance(attn.cross_attention.core_attention, SDPADotProductAttention)


def _fused_and_eager(dit, dsv_config=None):
    torch.manual_seed(0)
    eager = build_video_dit(dit, dsv_config=dsv_config)
    fused = build_video_dit(dit, dsv_config=dsv_config, fused=True)
    fused.load_state_dict(eager.state_dict())
    _perturb(eager)
    _perturb(fused)
    return fused, eager


def _step_grads(model, batch):
    model.zero_grad()
    loss = flow_matching_loss(model, *batch[:2], t=batch[2], noise=batch[3])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def dynamo_disabled():
    """torch.compile switched off for one test, through dynamo's own config patch (a monkeypatched
    attribute is not restored cleanly on torch 2.13 and breaks later compiles in the process)."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def test_fused_build_computes_the_eager_model(megatron_parallel, dynamo_disabled):
    """fused=True swaps in Megatron's bias-GELU (hand-written backward) and routes the adaLN
    modulation, residuals and q/k RMSNorm through torch.compile: with compilation switched off
    the step must be the eager build's, forward and every gradient."""
    fused, eager = _fused_and_eager(SMALL)
    assert fused.config.bias_activation_fusion and not eager.config.bias_activation_fusion
    assert fused.decoder.layers[0]._residual is not eager.decoder.layers[0]._residual  # compiled wrapper
    batch = _batch(SMALL)
    (lf, gf), (le, ge) = _step_grads(fused, batch), _step_grads(eager, batch)
    torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-6)
    assert gf.keys() == ge.keys()
    for name in ge:
        torch.testing.assert_close(gf[name], ge[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the fused tails runs on CUDA only")
def test_fused_compiled_matches_eager_cuda(megatron_parallel):
    """On the GPU the fused build really compiles. One bf16 step at batch 1 and 16k tokens (the case
    where Inductor's mix-order reduction broke adaLN gradients, see fused.py) must match the eager
    build within bf16 rounding, every gradient tensor, for the dense and the DSV (stage 1) model."""
    dit = SMALL.replace(latent_shape=(16, 64, 64))
    batch = tuple(t.cuda() for t in _batch(dit, n=1))
    for dsv_config in (None, DSV):
        fused, eager = (m.cuda().bfloat16() for m in _fused_and_eager(dit, dsv_config))
        (lf, gf), (le, ge) = _step_grads(fused, batch), _step_grads(eager, batch)
        torch.testing.assert_close(lf, le, rtol=2e-2, atol=1e-3)
        for name in ge:
            err = (gf[name].float() - ge[name].float()).norm() / ge[name].float().norm().clamp_min(1e-12)
            assert err < 3e-2, f"{name}: relative error {err:.3g} (dsv={dsv_config is not None})"


def test_output_independent_of_cube_layout(megatron_parallel):
    """Tokens and RoPE positions move together, and the output returns to raster order:
    the same weights give the same video whatever the cube shape (up to summation order)."""
    torch.manual_seed(0)
    a = build_video_dit(SMALL, cube=(1, 1, 1))  # raster order
    b = build_video_dit(SMALL, cube=(2, 4, 4))
    c = build_video_dit(SMALL.replace(latent_shape=(4, 14, 10)), cube=(2, 4, 4))  # partial cubes
    b.load_state_dict(a.state_dict())
    _perturb(a)
    _perturb(b)
    x, cap, t, _ = _batch(SMALL)
    with torch.no_grad():
        ref, out = a(x, t, cap), b(x, t, cap)
    assert not torch.equal(a.layout.perm, b.layout.perm)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (ref - x).abs().max() > 0  # the comparison is not trivially between zeros
    d = build_video_dit(SMALL.replace(latent_shape=(4, 14, 10)), cube=(1, 1, 1))
    d.load_state_dict(c.state_dict())
    _perturb(c)
    _perturb(d)
    xs = x[:, :, :, :14, :10]
    with torch.no_grad():
        torch.testing.assert_close(c(xs, t, cap), d(xs, t, cap), rtol=1e-5, atol=1e-5)


def test_dense_and_dsv_stage1_identical(megatron_parallel):
    torch.manual_seed(0)
    dense = build_video_dit(SMALL, cube=DSV.cube)
    dsv = build_video_dit(SMALL, dsv_config=DSV)
    missing, unexpected = dsv.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all(".core_attention." in k for k in missing)
    assert sum(isinstance(m, DSVDotProductAttention) for m in dsv.modules()) == SMALL.num_layers
    assert isinstance(dsv.decoder.layers[0].cross_attention.core_attention, SDPADotProductAttention)
    _perturb(dense)
    _perturb(dsv)
    x, cap, t, noise = _batch(SMALL)
    for step in range(2):
        losses = []
        for model in (dense, dsv):
            model.zero_grad()
            loss = flow_matching_loss(model, x, cap, t=t, noise=noise)
            loss.backward()
            losses.append(loss)
        assert torch.equal(losses[0], losses[1])
        for (name, p), q in zip(dense.named_parameters(), [p for p in dsv.parameters() if p.requires_grad]):
            assert torch.equal(p.grad, q.grad), name
    from megatron_dsv.layers import dsv_metrics

    summary = dsv_metrics(dsv)["summary"]
    assert summary["stage"] == 1 and summary["sparse_layers"] == 0


def _env(**extra):
    """The environment of a job run from a test: this checkout first on the path, then what the test
    process has (on the GPU image, megatron-core is installed there)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                **extra)


def _run_job(*extra, timeout=120):
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "examples" / "pretrain_video_dit.py"),
           "--latent-shape", "4", "16", "16", "--eval-iters", "1", "--eval-interval", "6",
           "--dsv-stage1-min-steps", "3", "--dsv-stage1-max-steps", "5", "--dsv-profile-interval-stage1", "1",
           "--dsv-profile-interval-stage2", "2", "--dsv-layer-sparsity-threshold", "0.2",
           # Stage 2's sparse path is what these runs test, at whatever budgets a few steps give: the density
           # rule with a bar of 1.0 makes every layer sparse (on a GPU, 'auto' would time these tiny shapes
           # and keep them dense).
           "--dsv-dispatch", "density", "--dsv-dense-fallback-density", "1.0", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _steps(out):
    return {int(m.group(1)): line for line in out.splitlines() if (m := re.match(r"step\s+(\d+)/", line))}


def test_main_job_reaches_stage2_and_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    out = _run_job("--train-iters", "10", "--exit-interval", "8", "--save", str(ckpt))
    steps = _steps(out)
    assert sorted(steps) == list(range(1, 9))
    assert "stage 1" in steps[1] and "stage 2" in steps[8]
    # in stage 1 the ETA says what it assumes (stage 2's speed is unknown until it starts)
    assert "at stage-1 speed, stage 2 by step 5" in steps[1] and "at stage-1 speed" not in steps[8]
    assert re.search(r"sparse layers 2/2", steps[8]), steps[8]
    assert "val " in steps[6]
    for line in steps.values():
        loss = float(re.search(r"loss ([\d.]+)", line).group(1))
        assert 0 < loss < 10
        assert re.search(r"sparsity 0\.\d+ \| recall [01]\.\d+", line), line
    # Resume: continues at step 9 in stage 2 with the saved schedule, and computes exactly what an
    # uninterrupted run computes (model, optimizer, DSV predictor and controller state all restored).
    out2 = _run_job("--train-iters", "10", "--load", str(ckpt))
    assert "resuming from step 8 of" in out2
    steps2 = _steps(out2)
    assert sorted(steps2) == [9, 10]
    assert "stage 2" in steps2[9] and "sparse layers 2/2" in steps2[9]
    straight = _steps(_run_job("--train-iters", "10"))
    for step in (9, 10):
        same = [re.search(r"loss [\d.]+ .*pred-loss [\d.]+", out)[0] for out in (steps2[step], straight[step])]
        assert same[0] == same[1], same


def _job_error(*extra):
    cmd = [sys.executable, str(ROOT / "examples" / "pretrain_video_dit.py"), "--latent-shape", "4", "16", "16", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    return proc.returncode, proc.stdout + proc.stderr


def test_checkpoint_errors_name_the_file_and_the_mismatch(tmp_path):
    code, out = _job_error("--load", str(tmp_path))
    assert code != 0 and "no checkpoint there" in out and "latest" in out and "Traceback" not in out
    out = _run_job("--train-iters", "2", "--save", str(tmp_path / "ckpt"))
    assert "note: the run ends at step 2, before stage 2 can start" in out   # _run_job: stage 1 takes 3 or more
    code, out = _job_error("--dense", "--train-iters", "3", "--load", str(tmp_path / "ckpt"))
    assert code != 0 and "another model" in out and "--dense False there, True here" in out
    code, out = _job_error("--dsv-estimator", "pooled", "--train-iters", "3", "--load", str(tmp_path / "ckpt"))
    assert code != 0 and "--dsv-estimator 'lowrank' there, 'pooled' here" in out   # (its predictor is untrained)
    # the preset's own hidden size given explicitly is the same model; a run that ends before the checkpoint
    # trains nothing and says so
    out = _run_job("--train-iters", "1", "--hidden-size", "128", "--load", str(tmp_path / "ckpt"))
    assert "resuming from step 2" in out and "nothing to train" in out and not _steps(out) and "done: 0 steps" in out
    # (head dim 64: the GPU's kernels build it)
    code, out = _job_error("--train-iters", "3", "--hidden-size", "256", "--load", str(tmp_path / "ckpt"))
    assert code != 0 and "hidden_size 128 there, 256 here" in out and "Traceback" not in out
    (tmp_path / "ckpt" / "iter_0000002.pt").write_bytes(b"not a checkpoint")
    code, out = _job_error("--train-iters", "3", "--load", str(tmp_path / "ckpt"))
    assert code != 0 and "cannot read" in out and "iter_0000002.pt" in out
    (tmp_path / "ckpt" / "latest").write_text("abc")
    code, out = _job_error("--train-iters", "3", "--load", str(tmp_path / "ckpt"))
    assert code != 0 and "should hold the step" in out and "Traceback" not in out


@pytest.mark.parametrize("argv, message", [
    (["--train-iters", "-5"], "--train-iters must be at least 1"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
    (["--dsv-block-q", "48"], "DSVConfig.block_q=48 is not one of"),
    (["--dsv-budget-policy", "target", "--dsv-target-density", "0.01"], "target_density=0.01 must lie in"),
    (["--dense", "--dsv"], "exclude each other"),
    (["--latent-shape", "0", "16", "16"], "latent T must be at least 1"),
    (["--num-attention-heads", "3"], "not divisible by num_heads 3"),
    (["--data", "folder"], "--data folder needs --data-path"),
    (["--clip-grad", "-1"], "--clip-grad must be a finite number, at least 0"),   # (it trained uphill)
    (["--clip-grad", "nan"], "--clip-grad must be a finite number"),
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--save", __file__], "exists and is not a directory"),   # (FileExistsError at the first save, after training)
    (["--log-json", "/nonexistent-dir/progress.jsonl"], "--log-json /nonexistent-dir/progress.jsonl: is a directory, or its"),
    (["--dsv-log", "/nonexistent-dir/dsv.jsonl"], "--dsv-log /nonexistent-dir/dsv.jsonl: is a directory, or its"),
    (["--log-json", "/"], "--log-json /: is a directory"),
])
def test_bad_command_lines_are_usage_errors(argv, message, capsys):
    import pretrain_video_dit

    with pytest.raises(SystemExit) as exit_info:
        pretrain_video_dit.get_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_every_dsv_flag_has_help_with_its_default():
    import pretrain_video_dit

    parser_help = subprocess.run([sys.executable, str(ROOT / "examples" / "pretrain_video_dit.py"), "--help"],
                                 capture_output=True, text=True, timeout=120,
                                 env=_env(COLUMNS="400")).stdout
    import dataclasses

    from megatron_dsv import DSVConfig
    entries, options = [], parser_help[parser_help.index("\noptions:"):]
    for line in options.splitlines():  # one entry per option: its line and the indented lines after it
        if line.startswith("  -"):
            entries.append(line.strip())
        elif entries:
            entries[-1] += " " + line.strip()
    for f in dataclasses.fields(DSVConfig):
        entry = next(e for e in entries if re.match("--dsv-" + f.name.replace("_", "-") + "[ ,]", e))
        assert "(default: " in entry and len(entry) > 60, entry
    assert "Warning" not in parser_help and pretrain_video_dit.get_args([]).train_iters == 100


def test_main_job_dense_baseline():
    out = _run_job("--train-iters", "3", "--dense")
    steps = _steps(out)
    assert sorted(steps) == [1, 2, 3] and all("| dense |" in line for line in steps.values())


def test_camera_over_images_data():
    pytest.importorskip("skimage", reason="scikit-image (optional, for the 'images' dataset) is not installed")
    from video_dit.data_images import NUM_CAPTIONS, CameraOverImages

    ds = CameraOverImages(4, (6, 24, 32), seed=1)
    x, cap = ds.batch(0, 8)
    y, cap2 = CameraOverImages(4, (6, 24, 32), seed=1).batch(0, 8)
    assert x.shape == (8, 4, 6, 24, 32) and torch.equal(x, y) and torch.equal(cap, cap2)
    assert not torch.equal(x, CameraOverImages(4, (6, 24, 32), seed=2).batch(0, 8)[0])
    assert torch.isfinite(x).all() and 0.3 < float(x.std()) < 3
    assert ((cap >= 0) & (cap < NUM_CAPTIONS)).all()
    # The camera moves: every clip changes over time, and neighbouring frames are closer than the ends.
    diff = lambda a, b: (x[:, :, a] - x[:, :, b]).abs().mean(dim=(1, 2, 3))  # noqa: E731
    assert (diff(0, -1) > 0.01).all()
    assert (diff(0, 1) < diff(0, -1)).float().mean() >= 0.75


def test_main_job_on_images():
    pytest.importorskip("skimage", reason="scikit-image (optional, for the 'images' dataset) is not installed")
    steps = _steps(_run_job("--train-iters", "2", "--data", "images", "--eval-interval", "2"))
    assert sorted(steps) == [1, 2] and "val " in steps[2]


def test_main_job_tensorboard_and_jsonl_logs(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (optional, for --tensorboard-dir) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run_job("--train-iters", "3", "--eval-interval", "3", "--eval-iters", "2", "--tensorboard-dir", str(tmp_path / "tb"),
             "--dsv-log", str(tmp_path / "dsv.jsonl"), "--log-json", str(tmp_path / "progress.jsonl"))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "dsv/block_sparsity", "dsv/recall"} <= tags
    assert len({t for t in tags if re.fullmatch(r"dsv/layer\d+/budget", t)}) == 2
    import json

    records = [json.loads(line) for line in (tmp_path / "dsv.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and len(records[0]["layers"]) == 2
    progress = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert progress[-1]["val_loss"] > 0 and progress[-1]["dsv"]["stage"] == 1
    per_batch = progress[-1]["val_losses"]   # one per held-out batch (--eval-iters)
    assert len(per_batch) == 2 and progress[-1]["val_loss"] == pytest.approx(sum(per_batch) / 2)
    assert progress[0]["val_losses"] is None   # steps without a validation


def test_e2e_bench_smoke(tmp_path):
    """bench/e2e.py runs end to end (CPU, tiny shapes) and writes its JSON; timings mean nothing here."""
    import json

    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "bench" / "e2e.py"), "--smoke", "--json",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in res] == ["dense", "dsv@0.90", "dsv@0.95"]
    assert all(r["sparse_layers"] == 2 for r in res[1:])
    assert res[1]["density"] > res[2]["density"] > 0


def test_step_bench_smoke(tmp_path):
    """bench/step.py runs every mode end to end (CPU, tiny shapes) with its profiler tables; timings mean
    nothing here."""
    import json

    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "bench" / "step.py"), "--smoke", "--json",
                           str(out), "--trace", str(tmp_path / "trace")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in res] == ["dense", "dsv-stage1", "dsv-stage1, no CUDA graphs", "dsv-stage1 profile",
                                        "dsv-stage2",
                                        "dsv-stage2, no CUDA graphs", "dsv-profile", "dsv-stage1 (1 profile in 20)",
                                        "dsv-stage2 (1 profile in 50)"]
    assert all(r["step_ms"] > 0 for r in res)
    assert all(0 < r["train_host_ms"] <= r["train_ms"] for r in res if "train_ms" in r)
    assert all((tmp_path / "trace" / f"{arm}_host_ops.txt").stat().st_size > 0
               for arm in ("dense", "dsv", "stage1", "profile", "stage1_profile"))


def test_eager_ab_bench_smoke(tmp_path):
    """bench/eager_ab.py runs its eager arms interleaved (CPU, tiny shapes) and writes its JSON; timings mean
    nothing here."""
    import json

    out = tmp_path / "eager_ab.json"
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "bench" / "eager_ab.py"), "--smoke", "--json",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["mode"] for r in res["results"]] == ["dense", "dsv-stage1", "dsv-stage1, no CUDA graphs", "dsv-stage2"]
    assert [r.get("sparse_layers") for r in res["results"]] == [None, 0, 0, 2]   # tiny: 2 layers
    assert all(0 < r["train_host_ms"] <= r["step_ms"] and len(r["step_ms_quartiles"]) == 3 for r in res["results"])
    assert res["results"][0]["paired_speedup_vs_dense"] == 1.0
    assert all(len(r["step_ms_per_round"]) == res["rounds"] and r["paired_speedup_vs_dense"] > 0 for r in res["results"])


def test_host_time_bench_smoke(tmp_path):
    """bench/host_time.py times the layers' functions in both arms (CPU, tiny shapes) and writes its JSON: every
    probed DSV function is met, each in the arm it belongs to; timings mean nothing here."""
    import json

    out = tmp_path / "host_time.json"
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "bench" / "host_time.py"), "--smoke", "--json",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    met = {(r["arm"], r["function"].strip()) for r in res["functions"] if r["calls_per_step"] > 0 and r["us_per_step"] > 0}
    assert {f for arm, f in met if arm == "dense"} == {"SDPA core attention forward", "dense_attention"}
    assert {f for arm, f in met if arm == "dsv-stage1"} >= {"DSV core attention forward", "SDPA core attention forward",
                                                            "backward: _learn", "end of backward: commit", "record_loss",
                                                            "apply_grads", "OnBackward.apply", "upkeep_stream.aside (entry + exit)"}
    assert set(res["step_host_ms"]) == {"dense", "dsv-stage1"}


def test_cp_bench_smoke(tmp_path):
    """bench/cp_bench.py runs every plan on 2 gloo processes (CPU, reference kernels) and writes its JSON: one
    row per (U, assignment, schedule), the three planner rows, phases and predictions; timings mean nothing."""
    import json
    import os

    out = tmp_path / "cp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(ROOT / "bench" / "cp_bench.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"][0]
    dsv = [r for r in res["rows"] if r["name"].startswith("dsv")]
    assert sorted((r["U"], r["assignment"], r["schedule"]) for r in dsv if r["kind"] == "fixed") == [
        (1, "naive", "gather"), (1, "naive", "ring"), (2, "capped", "gather"), (2, "lpt", "gather"),
        (2, "naive", "gather"), (2, "split", "gather")]
    assert {r["kind"] for r in dsv} == {"fixed", "planner (default cost)", "planner (calibrated cost)",
                                        "planner (measured pairs)"}
    assert all(r["predicted_calibrated_ms"] > 0 and r["phases_ms"]["selection"] > 0 for r in dsv)
    assert set(res["summary"]) >= {"planner_default", "planner_calibrated", "planner_measured"}


def _force_stage2(model, sparsity):
    for layer in (m for m in model.modules() if isinstance(m, DSVDotProductAttention)):
        state = layer.controller.state_dict()
        state["stage"].fill_(2)
        state["step"].fill_(1)  # not a profiling step
        state["block_sparsity"].fill_(sparsity)
        layer.controller.load_state_dict(state)


def test_dsv_stage2_through_the_model(megatron_parallel):
    """Stage 2 with every KV block selected equals dense; a real budget changes the output."""
    cfg = DSV.replace(budget_policy="theta", layer_sparsity_threshold=0.0, dense_fallback_density=1.0)
    torch.manual_seed(0)
    dense = build_video_dit(SMALL, cube=cfg.cube)
    dsv = build_video_dit(SMALL, dsv_config=cfg)
    dsv.load_state_dict(dense.state_dict(), strict=False)
    _perturb(dense)
    _perturb(dsv)
    x, cap, t, _ = _batch(SMALL)
    dense.eval()
    dsv.eval()
    with torch.no_grad():
        ref = dense(x, t, cap)
        _force_stage2(dsv, 0.0)
        full = dsv(x, t, cap)
        assert all(m.last_used_sparse for m in dsv.modules() if isinstance(m, DSVDotProductAttention))
        torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
        _force_stage2(dsv, 0.75)
        sparse = dsv(x, t, cap)
    assert (sparse - ref).abs().max() > 1e-4


def test_quality_script_smoke(tmp_path):
    """bench/quality.py trains dense and each DSV arm from the same seeds and summarises them per seed."""
    import json

    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--out", str(tmp_path), "--seeds", "1", "2",
         "--parallel", "2", "--arm", "target", "--dsv-budget-policy target --dsv-anneal-steps 0",
         "--arm", "uniform", "--dsv-budget-policy uniform --dsv-anneal-steps 0",
         "--", "--train-iters", "4", "--latent-shape", "4", "16", "16", "--eval-interval", "4", "--eval-iters", "1",
         "--dsv-stage1-min-steps", "1", "--dsv-stage1-max-steps", "2", "--dsv-target-density", "0.25",
         "--dsv-dense-fallback-density", "1.0"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "quality.json").read_text())
    assert summary["steps"] == 4 and set(summary["results"]) == {"dense", "target", "uniform"}
    for arm in ("target", "uniform"):
        rec = summary["results"][arm]
        assert rec["sparse_layers"] == [2, 2] and all(0.2 < d < 0.4 for d in rec["density"])
        dense = summary["results"]["dense"]["final_val_loss"]
        for seed in ("1", "2"):
            assert rec["val_gap_rel"][seed] == pytest.approx((rec["final_val_loss"][seed] - dense[seed]) / dense[seed])
            # each stage's training time against dense's over the same steps (a record shows the stage after its
            # step: step 2 ends stage 1 at its cap, so the records say stage 1 for step 1 and stage 2 for 2-4)
            speed = summary["speed"][f"{arm}_s{seed}"]
            assert speed["last_logged_step"] == {"1": 1, "2": 4}, speed
            assert set(speed["stage_x_dense"]) == {"1", "2"} and all(x > 0 for x in speed["stage_x_dense"].values())
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and (tmp_path / "dsv_profile_target.png").stat().st_size > 0


def test_main_job_bf16_with_fp32_masters():
    """The GPU default precision (bf16 weights, fp32 master weights) runs DSV stage 2 on CPU too:
    q, k and v reach the sparse kernel in one dtype."""
    steps = _steps(_run_job("--train-iters", "6", "--bf16"))
    assert "stage 2" in steps[6] and "sparse layers 2/2" in steps[6]
    assert all(0 < float(re.search(r"loss ([\d.]+)", line).group(1)) < 10 for line in steps.values())


def _write_video(path, frames, width=40, height=24, shift=2):
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.full((height, width, 3), 60, np.uint8)
            x0 = (i * shift) % (width - 8)
            img[:, x0:x0 + 8] = (250, 200, 40)  # a bar moving right
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_folder_data(tmp_path):
    pytest.importorskip("av", reason="PyAV (optional, for --data folder) is not installed")
    from video_dit.data_folder import VideoFolder

    _write_video(tmp_path / "a.mp4", 12)
    _write_video(tmp_path / "b.mkv", 9)
    _write_video(tmp_path / "short.mp4", 3)
    ds = VideoFolder(tmp_path, 4, (4, 8, 16), seed=0, frame_stride=2)
    assert [p.name for p, _ in ds.files] == ["a.mp4", "b.mkv"]  # a clip needs 7 frames: short.mp4 is skipped
    x, cap = ds.batch(0, 3)
    assert x.shape == (3, 4, 4, 8, 16) and torch.isfinite(x).all()
    assert torch.equal(x, VideoFolder(tmp_path, 4, (4, 8, 16), seed=0, frame_stride=2).batch(0, 3)[0])
    # The bar moves right: the column of the brightest red channel increases over time.
    cols = x[0, 0].mean(dim=1).argmax(dim=1)  # per frame, the column with the most red
    assert (cols[1:] >= cols[:-1]).all() and cols[-1] > cols[0]
    with pytest.raises(ValueError, match="frames a clip"):
        VideoFolder(tmp_path, 4, (40, 8, 16))
    with pytest.raises(ValueError, match="no video files"):
        VideoFolder(tmp_path / "empty_dir_that_is_missing", 4, (4, 8, 16))
    steps = _steps(_run_job("--train-iters", "2", "--data", "folder", "--data-path", str(tmp_path),
                            "--eval-interval", "2"))
    assert sorted(steps) == [1, 2] and "val " in steps[2]


def test_sharded_state_dict_covers_the_model(megatron_parallel):
    """Megatron's distributed checkpoint sees every tensor, the DSV predictor and controller included."""
    model = build_video_dit(SMALL, dsv_config=DSV)
    sharded = model.sharded_state_dict()
    assert set(sharded) == set(model.state_dict())
    assert any(k.endswith("core_attention.predictor.wq") for k in sharded)
    assert any(k.endswith("core_attention.controller.stage") for k in sharded)


@pytest.mark.parametrize("stage", [1, 2])
def test_packed_forward_equals_each_clip_alone(megatron_parallel, stage):
    """forward_packed on clips of mixed shapes gives each full-shape clip what forward gives it alone
    (stage 1 dense, stage 2 block-sparse with per-clip budgets): packing, per-token conditioning,
    per-clip captions and RoPE positions leak nothing between clips."""
    cfg = DSV.replace(budget_policy="theta", layer_sparsity_threshold=0.0, dense_fallback_density=1.0)
    torch.manual_seed(0)
    model = build_video_dit(SMALL, dsv_config=cfg)
    _perturb(model)
    model.eval()
    x, cap, t, _ = _batch(SMALL, n=2)
    other = MovingShapes(SMALL.latent_channels, (2, 12, 16), seed=3).batch(0, 1)[0][0]  # 96 tokens
    if stage == 2:
        _force_stage2(model, 0.75)
    with torch.no_grad():
        packed = model.forward_packed([x[0], other, x[1]], torch.stack([t[0], t[1], t[1]]),
                                      torch.stack([cap[0], cap[1], cap[1]]))
        alone = [model(x[i:i + 1], t[i:i + 1], cap[i:i + 1])[0] for i in range(2)]
    assert packed[1].shape == other.shape
    assert all(m.last_used_sparse == (stage == 2) for m in model.modules() if isinstance(m, DSVDotProductAttention))
    torch.testing.assert_close(packed[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[2], alone[1], rtol=1e-5, atol=1e-5)


def test_main_job_packed_clips():
    out = _run_job("--pack", "--train-iters", "6", "--micro-batch-size", "3")
    steps = _steps(out)
    assert 6 in steps and "stage 2" in steps[6] and "sparse layers 2/2" in steps[6], out[-2000:]


def test_stage1_takes_at_most_its_share_of_a_run():
    """GPU presets cap stage 1 at STAGE1_SHARE of --train-iters (never above the library's cap, never below
    the stage-1 minimum); an explicit --dsv-stage1-max-steps wins; the tiny CPU demo keeps its own."""
    from pretrain_video_dit import STAGE1_SHARE, TINY_DSV_DEFAULTS, get_args

    assert get_args(["--model", "small"]).dsv_stage1_max_steps == int(STAGE1_SHARE * 1000)
    assert get_args(["--model", "small", "--train-iters", "100000"]).dsv_stage1_max_steps == DSVConfig().stage1_max_steps
    assert get_args(["--model", "small", "--train-iters", "60"]).dsv_stage1_max_steps == DSVConfig().stage1_min_steps
    assert get_args(["--model", "small", "--dsv-stage1-max-steps", "900"]).dsv_stage1_max_steps == 900
    assert get_args([]).dsv_stage1_max_steps == TINY_DSV_DEFAULTS["dsv_stage1_max_steps"]


def test_captured_train_step_eager_steps_keep_no_autograd_graph(megatron_parallel):
    """An eager step of CapturedTrainStep returns a loss without its autograd graph: a caller keeping it
    until the next step would keep the parameters' gradient accumulators alive, which a capture then
    reuses from the legacy default stream (the failure of the example's first capture on an H200)."""
    from video_dit.step_graph import CapturedTrainStep

    torch.manual_seed(0)
    model = build_video_dit(SMALL, dsv_config=DSV, fused=False)   # stage 1: every step eager (CPU)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = CapturedTrainStep(model, params)(*_batch(SMALL))
    assert loss.grad_fn is None and not loss.requires_grad
    assert all(p.grad is not None for p in params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need the GPU")
def test_captured_train_step_matches_eager_steps(megatron_parallel):
    """examples' CapturedTrainStep: steps replayed from CUDA graphs give the eager steps' losses and
    gradients (fp32, the compiled tails and the Triton kernels in both), through stage 1 and stage 2,
    plain and profile steps each replayed from a graph of their own, and a budget change that captures
    anew; the DSV state (predictor, profiled statistics) follows the eager run's."""
    from video_dit.step_graph import MAX_GRAPHS, STABLE_STEPS, CapturedTrainStep

    cfg = DSV.replace(budget_policy="theta", stage1_min_steps=8, stage1_max_steps=8, profile_interval_stage1=2,
                      profile_interval_stage2=2, layer_sparsity_threshold=0.0,
                      budget_floor=0.0, dispatch="density", dense_fallback_density=1.0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_video_dit(SMALL, dsv_config=cfg, fused=True).cuda())
        _perturb(models[-1])
    eager, graphed = models
    params = [p for p in graphed.parameters() if p.requires_grad]
    runner = CapturedTrainStep(graphed, params)
    replayed_kinds = Counter()   # (stage, profile) of the replayed steps
    for i in range(20):
        if i == 15:   # new budgets (a new k_max captures anew; an equal one replays with the new budgets)
            for model in models:
                _force_stage2(model, 0.5)
                for layer in (m for m in model.modules() if isinstance(m, DSVDotProductAttention)):
                    state = layer.controller.state_dict()
                    state["step"].fill_(i)
                    layer.controller.load_state_dict(state)
        batch = tuple(t.cuda() for t in _batch(SMALL, seed=i))
        le, ge = _step_grads(eager, batch)
        graphed.zero_grad(set_to_none=True)
        key, before = replay_key(graphed), runner.replays
        lg = runner(*batch).detach().clone()
        if runner.replays > before:
            replayed_kinds[key[0].stage, key[0].profile] += 1
        gg = {n: p.grad for n, p in graphed.named_parameters() if p.requires_grad}
        torch.testing.assert_close(lg, le, rtol=1e-4, atol=1e-6, msg=lambda m: f"step {i}: {m}")
        for name in ge:
            torch.testing.assert_close(gg[name], ge[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"step {i} {name}: {m}")
        for le_, lg_ in zip(dsv_layers(eager), dsv_layers(graphed)):
            for name in ("wq", "wk"):
                torch.testing.assert_close(getattr(lg_.predictor, name), getattr(le_.predictor, name), rtol=1e-4,
                                           atol=1e-6, msg=lambda m: f"step {i} {name}: {m}")
            he, hg = le_.controller.host(), lg_.controller.host()
            assert (hg["stage"], hg["step"], hg["profiles"]) == (he["stage"], he["step"], he["profiles"]), i
            torch.testing.assert_close(torch.tensor(hg["block_sparsity"]), torch.tensor(he["block_sparsity"]),
                                       rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda m: f"step {i}: {m}")
        with torch.no_grad():   # the same plain SGD update on both, so later steps see trained weights
            for model in models:
                for p in model.parameters():
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-1e-2)
    # Stage 1 (steps 0-7): step 0 eager (no layer had run); plain steps 1, 3, 5 and profiles 2, 4, 6 each
    # capture at their third (STABLE_STEPS) and replay from then on. Stage 2 (8-19) likewise with keys of
    # its own, until the budget change at 15 (and wherever a profile moved a k_max).
    assert STABLE_STEPS == 3 and MAX_GRAPHS == 2
    assert replayed_kinds[1, False] >= 2 and replayed_kinds[1, True] >= 1, replayed_kinds
    assert replayed_kinds[2, False] >= 1 and replayed_kinds[2, True] >= 1, replayed_kinds
    layer = dsv_layers(graphed)[0]
    assert layer.controller.host()["step"] == 20 and layer.last_used_sparse
