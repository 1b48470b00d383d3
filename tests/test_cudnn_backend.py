"""backend='cudnn' (cuDNN frontend's block-sparse kernels) and backend='auto' choosing between GPU backends.

CPU: the errors and the routing. GPU with nvidia-cudnn-frontend installed: cuDNN's output and
gradients against the float64 reference on fresh random masks, its run-to-run reproducibility
against what cudnn_attention.BITWISE_REPRODUCIBLE claims, and auto's timed choice.
"""

import pytest
import torch

from megatron_dsv import DSVConfig
from megatron_dsv.ops import block_sparse_attention
from megatron_dsv.ops import backend_choice, cudnn_attention
from megatron_dsv.ops.reference import block_sparse_attention_reference

HAVE_CUDNN_BSA = torch.cuda.is_available() and cudnn_attention._module()[0] is not None
gpu = pytest.mark.skipif(not HAVE_CUDNN_BSA, reason="needs CUDA and nvidia-cudnn-frontend's block-sparse attention")


def _mask(b, h, n_q, n_kv, gen, device, zero_rows=True):
    """Random ascending block lists with -1 past each count; some rows empty."""
    cnt = torch.randint(1, n_kv + 1, (b, h, n_q), generator=gen)
    if zero_rows:
        cnt[..., 0] = 0
    k_max = int(cnt.max())
    idx = torch.full((b, h, n_q, k_max), -1, dtype=torch.int32)
    for i in range(b):
        for j in range(h):
            for r in range(n_q):
                c = int(cnt[i, j, r])
                idx[i, j, r, :c] = torch.randperm(n_kv, generator=gen)[:c].sort().values.to(torch.int32)
    return idx.to(device), cnt.to(torch.int32).to(device)


def test_cudnn_backend_on_cpu_names_why():
    q = torch.randn(1, 128, 2, 128)
    idx, cnt = _mask(1, 2, 2, 2, torch.Generator().manual_seed(0), "cpu")
    with pytest.raises(ValueError, match="backend='cudnn' cannot run this call.*needs CUDA tensors"):
        block_sparse_attention(q, q, q, idx, cnt, block_q=64, block_kv=64, backend="cudnn")
    assert DSVConfig(backend="cudnn").backend == "cudnn"


def test_layer_with_cudnn_backend_checks_head_dim_and_determinism_when_built(megatron_parallel):
    from test_layer import SMALL, core

    with pytest.raises(NotImplementedError, match="head dim 128"):
        core(DSVConfig(**SMALL, backend="cudnn", deterministic_backward=False), d=64)
    with pytest.raises(ValueError, match="not bitwise reproducible.*deterministic_mode"):
        core(DSVConfig(**SMALL, backend="cudnn"), d=128, deterministic_mode=True)
    assert core(DSVConfig(**SMALL, backend="cudnn"), d=128).cfg.backend == "cudnn"


@pytest.mark.parametrize("backend", ["cudnn", "triton-one-recompute"])
def test_non_reproducible_backends_refuse_deterministic_requests(backend):
    with pytest.raises(ValueError, match="backend.*deterministic_backward"):
        DSVConfig(backend=backend, deterministic_backward=True)
    assert DSVConfig(backend=backend).deterministic_backward is False   # allowed by default, as in FlashAttention


def test_config_lists_cudnn_as_its_kernels_declare():
    # DSVConfig's list is the policy; cudnn_attention.BITWISE_REPRODUCIBLE the fact (checked on the GPU).
    from megatron_dsv.config import NON_REPRODUCIBLE_BACKENDS
    assert ("cudnn" in NON_REPRODUCIBLE_BACKENDS) is (not cudnn_attention.BITWISE_REPRODUCIBLE)


def test_one_recompute_backend_refuses_a_deterministic_call():
    q = torch.randn(1, 64, 1, 32)
    idx, cnt = torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="triton-one-recompute.*not bitwise reproducible"):
        block_sparse_attention(q, q, q, idx, cnt, block_q=64, block_kv=64, backend="triton-one-recompute",
                               deterministic=True)
    with pytest.raises(ValueError, match="needs CUDA tensors"):   # off the GPU, without the interpreter
        block_sparse_attention(q, q, q, idx, cnt, block_q=64, block_kv=64, backend="triton-one-recompute")


def test_auto_times_only_between_several_allowed_kernels():
    runs = []
    assert backend_choice.choose_kernel(("k",), ["triton"], lambda: runs.append(1), torch.device("cpu")) == "triton"
    assert not runs


def test_auto_warms_up_times_and_keeps_the_fastest_once(monkeypatch):
    # Each candidate runs its warm-ups and its timed rounds; the one whose calls take least is kept,
    # and a shape is timed once. (Whether the calls are synchronised one by one only shows on a GPU.)
    import time

    calls = {"slow": 0, "fast": 0}

    def run(name, seconds):
        def fn():
            calls[name] += 1
            time.sleep(seconds)
        return fn

    monkeypatch.setattr(backend_choice, "_CHOSEN", {})
    runners = lambda: {"slow": run("slow", 0.004), "fast": run("fast", 0.001)}  # noqa: E731
    assert backend_choice.choose_kernel(("shape",), ["slow", "fast"], runners, torch.device("cpu")) == "fast"
    per_kernel = backend_choice.WARMUP + backend_choice.ROUNDS * backend_choice.CALLS_PER_ROUND
    assert calls == {"slow": per_kernel, "fast": per_kernel}
    assert backend_choice.choose_kernel(("shape",), ["slow", "fast"], runners, torch.device("cpu")) == "fast"
    assert calls == {"slow": per_kernel, "fast": per_kernel}


def test_auto_is_not_decided_by_one_slow_round(monkeypatch):
    # The faster kernel stalls once in its timed calls (a clock dip, another process): its mean over all
    # calls would then exceed the other's, the median of its rounds does not.
    import time

    calls = {"spiky": 0}
    stall = backend_choice.WARMUP + 2   # its first timed round's second call

    def spiky():
        calls["spiky"] += 1
        time.sleep(0.15 if calls["spiky"] == stall else 0.002)

    monkeypatch.setattr(backend_choice, "_CHOSEN", {})
    runners = lambda: {"steady": lambda: time.sleep(0.008), "spiky": spiky}  # noqa: E731
    notices = []
    monkeypatch.setattr(backend_choice, "notice", notices.append)
    assert backend_choice.choose_kernel(("shape",), ["steady", "spiky"], runners, torch.device("cpu")) == "spiky"
    assert f"median of {backend_choice.ROUNDS} rounds" in notices[-1] and "-> spiky" in notices[-1]


def test_auto_drops_a_kernel_that_fails_in_a_timed_round(monkeypatch):
    calls = {"n": 0}

    def breaks_later():   # passes its warm-ups and its first round, fails in the second
        calls["n"] += 1
        if calls["n"] > backend_choice.WARMUP + backend_choice.CALLS_PER_ROUND:
            raise RuntimeError("launch failed")

    monkeypatch.setattr(backend_choice, "_CHOSEN", {})
    notices = []
    monkeypatch.setattr(backend_choice, "notice", notices.append)
    runners = lambda: {"breaks": breaks_later, "works": lambda: None}  # noqa: E731
    assert backend_choice.choose_kernel(("shape",), ["breaks", "works"], runners, torch.device("cpu")) == "works"
    assert any("'breaks' failed" in n and "launch failed" in n for n in notices)
    assert "breaks" not in notices[-1].split(":")[-1]


def test_auto_and_cudnn_selection_run_our_kernels():
    # Selection has no cuDNN kernel: 'cudnn' and 'auto' run ours (the reference on CPU).
    assert backend_choice.resolve_backend("cudnn", torch.device("cpu")) == "reference"
    assert backend_choice.resolve_backend("auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="not one of"):
        backend_choice.resolve_backend("cudnn9", torch.device("cpu"))


@gpu
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("layout", ["bshd", "sbhd"])
def test_cudnn_matches_reference(block, layout):
    gen = torch.Generator().manual_seed(block + len(layout))
    b, s, h, d = 2, 8 * block, 3, 128
    shape = (b, s, h, d) if layout == "bshd" else (s, b, h, d)
    q, k, v, dout = (torch.randn(shape, generator=gen).cuda().bfloat16() for _ in range(4))
    idx, cnt = _mask(b, h, s // block, s // block, gen, "cuda")
    outs, grads = [], []
    for backend, dtype in (("cudnn", torch.bfloat16), ("reference", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        fn = block_sparse_attention if backend == "cudnn" else block_sparse_attention_reference
        kwargs = dict(backend="cudnn", deterministic=False) if backend == "cudnn" else dict(
            scale=d ** -0.5, return_lse=False, segments=None, kv_lens=None)
        out = fn(*leaves, idx, cnt, block_q=block, block_kv=block, layout=layout, **kwargs)
        outs.append(out)
        grads.append(torch.autograd.grad(out, leaves, dout.to(dtype)))
    def rel(x, ref):
        return float((x.double() - ref).norm() / ref.norm())

    empty = (cnt == 0).repeat_interleave(block, dim=-1)  # [b, h, s]
    out_bhs = outs[0].float().transpose(1, 2) if layout == "bshd" else outs[0].float().permute(1, 2, 0, 3)
    assert torch.isfinite(outs[0]).all()
    assert out_bhs[empty].abs().max() == 0, "rows with no KV blocks must be 0"
    assert rel(outs[0], outs[1]) < 1e-2
    for g, ref, name in zip(grads[0], grads[1], "qkv"):
        assert torch.isfinite(g).all(), name
        assert rel(g, ref) < 2e-2, (name, rel(g, ref))


@gpu
def test_cudnn_reproducibility_is_as_declared():
    gen = torch.Generator().manual_seed(3)
    b, s, h, d = 1, 4096, 4, 128
    q, k, v, dout = (torch.randn(b, s, h, d, generator=gen).cuda().bfloat16() for _ in range(4))
    idx, cnt = _mask(b, h, s // 64, s // 64, gen, "cuda", zero_rows=False)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = block_sparse_attention(*leaves, idx, cnt, block_q=64, block_kv=64, backend="cudnn",
                                     deterministic=False)
        return torch.autograd.grad(out, leaves, dout)

    runs = [grads() for _ in range(3)]
    same = all(torch.equal(a, b_) for r in runs[1:] for a, b_ in zip(runs[0], r))
    assert same == cudnn_attention.BITWISE_REPRODUCIBLE, f"cuDNN backward bitwise reproducible: {same}"
    if not cudnn_attention.BITWISE_REPRODUCIBLE:
        with pytest.raises(ValueError, match="not bitwise reproducible"):
            block_sparse_attention(q, k, v, idx, cnt, block_q=64, block_kv=64, backend="cudnn", deterministic=True)


@gpu
def test_auto_times_both_backends_once_per_shape(capsys):
    gen = torch.Generator().manual_seed(4)
    b, s, h, d = 1, 8192, 4, 128
    q, k, v = (torch.randn(b, s, h, d, generator=gen).cuda().bfloat16() for _ in range(3))
    idx, cnt = _mask(b, h, s // 64, s // 64, gen, "cuda")
    backend_choice._CHOSEN.clear()
    for _ in range(2):
        block_sparse_attention(q, k, v, idx, cnt, block_q=64, block_kv=64, deterministic=False)
    timed = [line for line in capsys.readouterr().err.splitlines() if "forward + backward" in line]
    assert len(timed) == 1, timed
    assert all(name in timed[0] for name in ("triton ", "cudnn ")) and "one-recompute" not in timed[0], timed
    assert list(backend_choice._CHOSEN.values()) == [timed[0].split("-> ")[-1]]
    # A reproducible call runs Triton's atomic-free kernels, untimed.
    block_sparse_attention(q, k, v, idx, cnt, block_q=64, block_kv=64, deterministic=True)
    assert len(backend_choice._CHOSEN) == 1


@gpu
def test_cudnn_kernels_replay_from_a_cuda_graph():
    """cuDNN's kernels captured in a CUDA graph (auto may pick them, as the default allows, in a layer whose
    steps replay from graphs): the forward + backward replayed on new inputs gives what eager calls give."""
    gen = torch.Generator().manual_seed(5)
    b, s, h, d = 1, 4096, 4, 128
    make = lambda: torch.randn(b, s, h, d, generator=gen).cuda().bfloat16()  # noqa: E731
    idx, cnt = _mask(b, h, s // 64, s // 64, gen, "cuda")
    leaves = [make().requires_grad_() for _ in range(3)]
    dout = make()

    def step(q, k, v):
        out = block_sparse_attention(q, k, v, idx, cnt, block_q=64, block_kv=64, backend="cudnn")
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(*leaves)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step(*leaves)
    for _ in range(2):
        fresh = [make() for _ in range(3)]
        with torch.no_grad():
            for leaf, x in zip(leaves, fresh):
                leaf.copy_(x)
        graph.replay()
        eager = step(*(x.clone().requires_grad_() for x in fresh))
        for name, a, e in zip(("out", "dq", "dk", "dv"), static, eager):
            torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")
