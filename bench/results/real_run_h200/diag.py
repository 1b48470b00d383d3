"""Diagnostics (GPU): where stage 1 syncs the device; why the example's dense step capture fails."""
import collections, os, subprocess, sys, traceback, warnings
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "examples")); sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
which = sys.argv[1]
if which == "sync":
    import torch, argparse
    import step as S
    from megatron_dsv import DSVConfig
    from video_dit.configs import PRESETS
    args = argparse.Namespace(micro_batch_size=2, data="images", cube=[4, 4, 4])
    S.init_single_process(torch.device("cuda"))
    cfg = DSVConfig().replace(budget_policy="theta", layer_sparsity_threshold=0.0, budget_floor=0.0)
    tr = S.Trainer(PRESETS["small"], cfg, args, torch.device("cuda"))
    stage1 = lambda: S.set_state(tr.layers, stage=1, step=1)
    for _ in range(3):
        stage1(); tr.step()
    seen = collections.Counter()
    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if "megatron_dsv" in f.filename or "examples" in f.filename or "bench" in f.filename]
        seen[" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[-3:][::-1])] += 1
    warnings.showwarning = show
    warnings.simplefilter("always")
    stage1()
    torch.cuda.set_sync_debug_mode("warn")
    t = tr.step()
    torch.cuda.set_sync_debug_mode(0)
    print("stage-1 step syncs:", sum(seen.values()))
    for k, v in seen.most_common(25):
        print(f"{v:4d}  {k}")
else:
    import torch
    import video_dit.step_graph as sg
    orig = sg.CapturedTrainStep._capture
    if which == "sync_first":
        def patched(self, *a):
            torch.cuda.synchronize(); return orig(self, *a)
        sg.CapturedTrainStep._capture = patched
    elif which == "thread_local":
        real = torch.cuda.graph
        sg.torch.cuda.graph = lambda g, **kw: real(g, capture_error_mode="thread_local", **kw)
    elif which == "more_steps":
        sg.STABLE_STEPS = 6
    import pretrain_video_dit as P
    try:
        P.main(["--dense", "--model", "small", "--data", "images", "--train-iters", "8", "--log-interval", "4", "--eval-interval", "1000"])
        print(which, "OK")
    except Exception as e:
        print(which, "FAILED", type(e).__name__, str(e)[:150])
        ctx = e.__context__ or e.__cause__
        if ctx is not None:
            print("FIRST:", "".join(traceback.format_exception(ctx))[-6000:])
