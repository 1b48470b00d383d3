"""Whole-step CUDA-graph support of the DSV layers (megatron_dsv.layers.step_graph).

On CPU a "replay" is simulated by running the step's forward and backward inside capturing() and
then calling replayed(): what a real replay does, except that the kernels are launched by the
host. Before it, as before a real capture, a warm-up pass runs inside capturing(warm_up=True). Such steps must equal eager training steps in outputs, gradients and every piece of DSV
state, and replay_key must say None exactly for the steps a graph cannot replay. The real capture
(examples/video_dit/step_graph.py) is checked against eager steps on the GPU in test_example.py.
"""

import traceback

import pytest
import torch
from megatron.core.transformer.transformer_block import TransformerBlock
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_dsv import DSVConfig
from megatron_dsv.layers import get_dsv_layer_spec
from megatron_dsv.layers.step_graph import capturing, dsv_layers, replay_key, replayed
from test_layer import SMALL, tconfig

CFG = DSVConfig(**SMALL, budget_policy="theta", stage1_min_steps=2, stage1_max_steps=2, profile_interval_stage2=3,
                layer_sparsity_threshold=0.0, budget_floor=0.0, dispatch="density", dense_fallback_density=1.0)


def block():
    torch.manual_seed(0)
    return TransformerBlock(tconfig(), get_dsv_layer_spec(CFG))


def step(model, x, as_replay: bool):
    x = x.clone().requires_grad_()
    if as_replay:
        with capturing(model, warm_up=True):   # no training step: it must leave every DSV state as it is
            model(x, attention_mask=None).square().mean().backward()
        model.zero_grad(set_to_none=True)
        x.grad = None
        with capturing(model) as captured:
            out = model(x, attention_mask=None)
            out.square().mean().backward()
        replayed(model, captured)
    else:
        out = model(x, attention_mask=None)
        out.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def test_replayed_steps_equal_eager_steps(megatron_parallel):
    eager, graphed = block(), block()
    gen = torch.Generator().manual_seed(1)
    keys = []
    for i in range(9):
        x = torch.randn(128, 1, 64, generator=gen)
        key = replay_key(graphed)
        keys.append(key)
        want = step(eager, x, as_replay=False)
        got = step(graphed, x, as_replay=key is not None)
        for a, b in zip(want, got):
            if isinstance(a, list):
                assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b)), i
            else:
                assert torch.equal(a, b), i
        for la, lb in zip(dsv_layers(eager), dsv_layers(graphed)):
            assert repr(la.controller.host()) == repr(lb.controller.host()), i   # repr: NaN equals NaN
            assert la.predictor.wq.equal(lb.predictor.wq) and la.last_used_sparse == lb.last_used_sparse, i
    steps = [la.controller.host()["step"] for la in dsv_layers(graphed)]
    assert steps == [9, 9]
    # Every step replays but the first (the layers had not run): stage 1 (steps 0, 1) trains the predictor
    # and profiles at step 0; stage 2 profiles at steps 3 and 6 (every 3rd), with a key of their own.
    assert [k is not None for k in keys] == [False] + [True] * 8, keys
    profiles = [all(plan.profile for plan in key) for key in keys[1:]]
    assert profiles == [False, False, True, False, False, True, False, False], profiles
    assert dsv_layers(graphed)[0].last_used_sparse
    assert dsv_layers(graphed)[0].controller.host()["profiles"] == 3   # steps 0, 3, 6: the replayed ones count


def test_replayed_stage1_steps_train_the_predictor_as_eager_steps(megatron_parallel):
    """Stage-1 steps replay, those that train the predictor and those that also profile (with the profile's
    own selection, at budgets plan_step placed on the device): the loss, gradients, Adam step and profile
    come from the captured pass on the rows the device's step counter picks (not from the warm-up pass
    before it), the loss's and the profile's EMAs follow the replay, and predictor, controller state and
    outputs equal an eager run's bit for bit."""
    cfg = CFG.replace(stage1_min_steps=8, stage1_max_steps=8, profile_interval_stage1=4, sample_stride=2)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(TransformerBlock(tconfig(), get_dsv_layer_spec(cfg)))
    eager, graphed = models
    gen = torch.Generator().manual_seed(2)
    replays = 0
    for i in range(8):
        x = torch.randn(128, 1, 64, generator=gen)
        as_replay = replay_key(graphed) is not None
        replays += as_replay
        for a, b in zip(step(eager, x, as_replay=False), step(graphed, x, as_replay=as_replay)):
            assert all(torch.equal(u, v) for u, v in zip(a, b)) if isinstance(a, list) else torch.equal(a, b), i
        for la, lb in zip(dsv_layers(eager), dsv_layers(graphed)):
            assert la.predictor.wq.equal(lb.predictor.wq) and la.predictor.wk.equal(lb.predictor.wk), i
            assert repr(la.controller.host()) == repr(lb.controller.host()), i
    assert replays == 7   # all but step 0 (no layer had run), the profile at step 4 included
    layer = dsv_layers(graphed)[0]
    # The stage-1 cap (8 steps) switched the layer to stage 2 after a replayed step, as after an eager one.
    assert layer.controller.host()["stage"] == 2 and layer.controller.host()["step"] == 8
    assert not layer.predictor.wq.equal(layer.predictor.wk)   # they start equal: the predictor trained
    assert layer.controller.host()["profiles"] == 2   # steps 0 and 4


def test_key_follows_k_max_not_budgets_and_profile_steps_have_their_own(megatron_parallel):
    """The key holds each layer's k_max (block-list width, a power of two), not its budgets: replay_key
    places new budgets in the tensor the selection reads, so a graph replays across them."""
    model = block()
    x = torch.randn(128, 1, 64)
    for _ in range(4):   # stage 1 (2 steps), a plain stage-2 step, a profile (step 3)
        step(model, x, as_replay=False)
    key = replay_key(model)
    assert key is not None and key == replay_key(model)
    layer = dsv_layers(model)[0]

    def set_sparsity(value):
        state = layer.controller.state_dict()
        state["block_sparsity"].copy_(torch.as_tensor(value))
        layer.controller.load_state_dict(state)

    set_sparsity(0.25)   # 3 of the 4 KV blocks
    key = replay_key(model)
    held = layer.device_budgets.tensor
    set_sparsity(torch.tensor([0.25, 0.5]))   # new budgets, the same k_max (3, on the GPU rounded up to 4)
    assert replay_key(model) == key
    assert layer.device_budgets.tensor is held and held.tolist() == layer.controller.budgets(4) == [3, 2]
    set_sparsity(0.75)   # 1 block: k_max 1
    assert replay_key(model) not in (None, key) and held.tolist() == [1, 1]
    plain = replay_key(model)
    for _ in range(2):   # on to the next profile step (step 6): a key of its own, with the same k_max
        step(model, x, as_replay=replay_key(model) is not None)
    profile = replay_key(model)
    assert profile not in (None, plain) and all(p.profile and not q.profile for p, q in zip(profile, plain))
    assert [p.k_max for p in profile] == [p.k_max for p in plain]
    fresh = block()   # no layer has run: no plan, no capture
    assert replay_key(fresh) is None
    with pytest.raises(RuntimeError, match="replay_key is None"):
        step(fresh, x, as_replay=True)


class HostData(TorchDispatchMode):
    """Records the ops run under it that make a tensor of host data (torch.tensor of a list, indexing by a
    list): on the GPU each is a copy from the host, which a capture refuses from pageable memory and
    freezes from pinned memory (a replay would reread the captured values)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("lift_fresh", "lift_fresh_copy"):
            self.seen.append("".join(traceback.format_stack(limit=4)[:-1]))
        return func(*args, **(kwargs or {}))


def test_captured_steps_take_nothing_from_the_host(megatron_parallel):
    """Inside capturing(), plain and profile steps of both stages make no tensor of host data, also where
    the budgets changed since the last step (replay_key places them on the device, the profile's own
    selection's included). The stage-1 profile indexed the predictor's weights by a host list of all
    heads until 2026-11-30, which only the GPU capture showed ("Cannot copy between CPU and CUDA
    tensors")."""
    torch.manual_seed(0)
    model = TransformerBlock(tconfig(), get_dsv_layer_spec(CFG.replace(stage1_min_steps=4, stage1_max_steps=4,
                                                                       profile_interval_stage1=2)))
    gen = torch.Generator().manual_seed(5)
    kinds = set()
    for i in range(8):   # stage 1: steps 0-3, profiles at 0 and 2; stage 2: profiles at 6 (every 3rd)
        for layer in dsv_layers(model):   # budgets of 3 (steps 0, 1), 2 (steps 2, 3), 3... of the 4 KV blocks
            state = layer.controller.state_dict()
            state["block_sparsity"].fill_(0.25 * (1 + i // 2 % 2))
            layer.controller.load_state_dict(state)
        key = replay_key(model)
        x = torch.randn(128, 1, 64, generator=gen, requires_grad=True)
        if key is None:   # step 0: no layer has run
            model(x, attention_mask=None).square().mean().backward()
            continue
        with HostData() as host_data, capturing(model) as captured:
            model(x, attention_mask=None).square().mean().backward()
        replayed(model, captured)
        assert not host_data.seen, (i, host_data.seen)
        kinds |= {(plan.stage, plan.profile) for plan in key}
    assert kinds == {(1, False), (1, True), (2, False), (2, True)}, kinds


def test_an_evaluation_at_another_shape_leaves_the_key(megatron_parallel):
    """The key is planned at the shape of each layer's last training step: an evaluation in between, at
    another length, leaves it (a caller capturing after it would otherwise plan the wrong shape)."""
    model = block()
    x = torch.randn(128, 1, 64)
    for _ in range(2):
        step(model, x, as_replay=replay_key(model) is not None)
    key = replay_key(model)
    model.eval()
    with torch.no_grad():
        model(torch.randn(256, 1, 64), attention_mask=None)
    model.train()
    assert key is not None and replay_key(model) == key


def test_capturing_refuses_context_parallel_layers(megatron_parallel):
    model = block()
    layer = dsv_layers(model)[0]
    layer.cp = object()
    with pytest.raises(NotImplementedError, match="context parallelism"):
        with capturing(model):
            pass
    assert replay_key(model) is None
    assert not layer.in_step_graph


def _assert_same_host_state(got, want, rtol: float, where) -> None:
    """Controller host states equal: ints, stages and lists exactly, floats within rtol (0: bitwise)."""
    assert type(got) is type(want), where
    if isinstance(got, dict):
        assert got.keys() == want.keys(), where
        for key in got:
            _assert_same_host_state(got[key], want[key], rtol, (where, key))
    elif isinstance(got, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same_host_state(a, b, rtol, (where, i))
    elif isinstance(got, float) and rtol:
        assert got == pytest.approx(want, rel=rtol, abs=1e-7, nan_ok=True), where
    else:
        assert got == want or (got != got and want != want), where   # NaN: unprofiled in both


def _compiled_planned_against_eager(planned, eager, compiled, inputs, backward, host_rtol=0.0, **tolerance) -> set:
    """Training steps of two equal layers on the same inputs ([q, k, v] per step): `planned` runs inside
    capturing() wherever replay_key allows, through `compiled` (its torch.compile) where the step does
    not learn (StepPlan.learns: a profile, predictor fine-tuning), else eagerly; `eager` always eagerly.
    backward(out, step) runs the backward. Each step's output, gradients, dispatch and controller state
    (its floats within host_rtol) must agree. Returns the replay keys of the compiled steps."""
    keys = set()
    for i, qkv in enumerate(inputs):
        key = replay_key(planned)
        results = []
        for layer in (planned, eager):
            q, k, v = (t.clone().requires_grad_() for t in qkv)
            if layer is planned and key is not None:
                run = layer if any(plan.learns for plan in key) else compiled
                with capturing(layer) as captured:
                    out = run(q, k, v, None)
                    backward(out, i)
                replayed(layer, captured)
            else:
                out = layer(q, k, v, None)
                backward(out, i)
            results.append((out.detach(), q.grad, k.grad, v.grad))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, **tolerance)
        assert planned.last_used_sparse == eager.last_used_sparse
        _assert_same_host_state(planned.controller.host(), eager.controller.host(), host_rtol, i)
        if key is not None and not any(plan.learns for plan in key):
            keys.add(key)
    return keys


def test_planned_stage2_training_steps_compile_fullgraph(megatron_parallel):
    """A stage-2 training step run inside capturing() reads only the decisions fixed on entry, so
    torch.compile traces the layer whole (fullgraph=True) with no guard on the step counter: steps
    with the same budgets reuse one graph, and outputs, gradients and DSV state equal eager steps (a
    profile step, which learns, runs planned but uncompiled)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from test_layer import _stage2_layer

    torch._dynamo.reset()
    # a quarter of the blocks from the switch on; a profile (and predictor fine-tuning) every 3 steps
    fixed = dict(target_density=0.25, anneal_steps=0, profile_interval_stage2=3)
    (planned, _), (eager, _) = _stage2_layer(**fixed), _stage2_layer(**fixed)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(planned, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(3)
    inputs = [[torch.randn(256, 1, 2, 32, generator=gen) for _ in range(3)] for _ in range(8)]
    keys = _compiled_planned_against_eager(planned, eager, compiled, inputs,
                                           lambda out, i: out.square().mean().backward(), rtol=1e-5, atol=1e-6)
    assert planned.last_used_sparse and len(keys) >= 1
    assert 1 <= counter.frame_count <= len(keys), (counter.frame_count, keys)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels and inductor on the GPU")
def test_planned_stage2_training_steps_compile_fullgraph_on_the_gpu(megatron_parallel):
    """On the GPU (Triton kernels, inductor), as on CPU: stage-2 training steps run inside capturing()
    compile whole (fullgraph=True), steps with the same k_max reuse one graph, and outputs and gradients
    match the eager layer's. float32: in bf16 a projection rounded differently by inductor could flip a
    near-tie in the top-k and move a whole query block's rows."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from test_layer import core

    torch._dynamo.reset()
    cfg = DSVConfig(block_q=64, cube=(4, 4, 4), block_kv=64, stage1_min_steps=1, stage1_max_steps=1,
                    layer_sparsity_threshold=0.0, budget_floor=0.0, dispatch="density", dense_fallback_density=1.0,
                    target_density=0.25, anneal_steps=0, profile_interval_stage2=4, backend="triton")
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        layers.append(core(cfg, heads=4, d=64).cuda())
    planned, eager = layers
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(planned, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(0)
    inputs, grads = [], []
    for _ in range(8):
        inputs.append([torch.randn(1024, 2, 4, 64, generator=gen).cuda() for _ in range(3)])
        grads.append(torch.randn(1024, 2, 256, generator=gen).cuda())
    # host_rtol: the controller's floats (profiled statistics, predictor loss) are sums over GPU reductions
    # and inductor's fused kernels, whose order of additions may differ from the eager layer's (the
    # profile's per-cube sums used atomics until 2026-11-30: this test saw their last bits differ).
    keys = _compiled_planned_against_eager(planned, eager, compiled, inputs, lambda out, i: out.backward(grads[i]),
                                           host_rtol=1e-5, rtol=1e-4, atol=1e-5)
    assert planned.last_used_sparse and len(keys) >= 1
    assert 1 <= counter.frame_count <= len(keys), (counter.frame_count, keys)
