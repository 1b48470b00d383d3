"""DSVDotProductAttention inside real megatron-core modules, on CPU with gloo."""

import copy
import math

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import CrossAttention, CrossAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from megatron_dsv import DSVConfig
from megatron_dsv.layers.controller import StageController, profiled_columns
from megatron_dsv.layers.device_budgets import DeviceBudgets
from megatron_dsv.layers.predictor import LowRankPredictor
from megatron_dsv.layers import attention as attention_module
from megatron_dsv.layers.profiler import profile_logits, selection_recall
from megatron_dsv.layers import (DSVDotProductAttention, SDPADotProductAttention, apply_dsv, dsv_metrics,
                                 get_dsv_layer_spec)
from megatron_dsv.ops import block_sparse_attention
from triton_cases.runner import run_cases

SMALL = dict(rank=8, block_q=32, cube=(2, 4, 4), block_kv=32, sample_stride=4)


def tconfig(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=2, use_cpu_initialization=True,
                attention_dropout=0.0, hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def dense_spec():
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    return spec


def core(dsv=None, heads=2, d=32, **kw):
    cfg = tconfig(hidden_size=heads * d, num_attention_heads=heads, **kw)
    return DSVDotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.no_mask,
                                  attention_type="self", dsv_config=dsv or DSVConfig(**SMALL))


def train_steps(layer, batches):
    for q, k, v in batches:
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        layer(q, k, v, None).square().mean().backward()


# --------------------------------------------------------------------------- spec


def test_apply_dsv_replaces_only_self_attention(megatron_parallel):
    cross = ModuleSpec(module=CrossAttention, params={"attn_mask_type": AttnMaskType.no_mask},
                       submodules=CrossAttentionSubmodules(linear_q=None, linear_kv=None, linear_proj=None,
                                                           core_attention=SDPADotProductAttention))
    spec = dense_spec()
    spec.submodules.cross_attention = cross
    before = copy.deepcopy(spec)
    cfg = DSVConfig(**SMALL)
    out = apply_dsv(spec, cfg)
    core_spec = out.submodules.self_attention.submodules.core_attention
    assert core_spec.module is DSVDotProductAttention and core_spec.params["dsv_config"] is cfg
    assert out.submodules.cross_attention.submodules.core_attention is SDPADotProductAttention
    assert spec.submodules.self_attention.submodules.core_attention is SDPADotProductAttention  # not mutated
    assert repr(spec) == repr(before)


def test_apply_dsv_custom_slot_and_block_lists(megatron_parallel):
    """A WAN-style custom self-attention slot, inside a list of layer specs, is found."""
    layer = dense_spec()
    custom = ModuleSpec(module=("some.recipe.module", "WanAttention"), submodules=layer.submodules.self_attention.submodules)
    wan_like = {"full_self_attention": custom, "cross_attention": copy.deepcopy(custom)}
    out = apply_dsv([wan_like, layer], DSVConfig(**SMALL))
    assert out[0]["full_self_attention"].submodules.core_attention.module is DSVDotProductAttention
    assert out[0]["cross_attention"].submodules.core_attention is SDPADotProductAttention
    assert out[1].submodules.self_attention.submodules.core_attention.module is DSVDotProductAttention


def test_apply_dsv_without_self_attention_fails_loudly():
    with pytest.raises(ValueError, match="found no self-attention"):
        apply_dsv(ModuleSpec(module=torch.nn.Linear), DSVConfig())
    with pytest.raises(ValueError, match="dsv_config must be a DSVConfig"):
        apply_dsv(dense_spec(), {"rank": 4})


# ------------------------------------------------------------------ stage 1 = dense


def test_stage1_matches_dense_block_and_gradients(megatron_parallel):
    """In stage 1 the DSV block computes exactly the dense block's outputs and DiT gradients."""
    torch.manual_seed(0)
    dense = TransformerBlock(tconfig(), dense_spec())
    dsv = TransformerBlock(tconfig(), get_dsv_layer_spec(DSVConfig(**SMALL)))
    missing, unexpected = dsv.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(".predictor." in k or ".controller." in k for k in missing)

    for step in range(3):
        x = torch.randn(128, 2, 64)
        outs, grads = [], []
        for block in (dense, dsv):
            block.zero_grad()
            xi = x.clone().requires_grad_()
            y = block(xi, attention_mask=None)
            y.square().mean().backward()
            outs.append(y)
            grads.append([xi.grad] + [p.grad for p in block.parameters() if p.requires_grad])
        assert torch.equal(outs[0], outs[1])
        assert len(grads[0]) == len(grads[1])
        for g0, g1 in zip(*grads):
            assert torch.equal(g0, g1)
    # The predictor trained (its weights moved) without touching the block's parameters' grads.
    layer = dsv.layers[0].self_attention.core_attention
    assert layer.controller.host()["step"] == 3
    assert not layer.predictor.wq.requires_grad and layer.predictor.adam_step.item() == 3


# ----------------------------------------------------------- learning a planted pattern


BASIS = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(99)))[0][:, :4]


def planted_batch(gen, s=256, b=1, heads=2, d=32, r=4, block_q=32, block_kv=32, picks=2, strength=4.0,
                  basis=BASIS):
    """Keys cluster around one centroid per KV block; each query block attends to `picks` KV blocks.
    Centroids live in a fixed rank-r subspace (as if q and k came from fixed projections) and vary
    per batch; the noise spans all d dims. A rank-r predictor can learn the subspace."""
    n_q, n_kv = s // block_q, s // block_kv
    cent = torch.randn(heads, n_kv, r, generator=gen) @ basis.T * strength / math.sqrt(r) * 2
    k = cent.repeat_interleave(block_kv, 1).permute(1, 0, 2) + 0.3 * torch.randn(s, heads, d, generator=gen)
    targets = torch.stack([torch.randperm(n_kv, generator=gen)[:picks] for _ in range(heads * n_q)]).view(heads, n_q, picks)
    q_cent = torch.stack([cent[h, targets[h]].sum(1) for h in range(heads)])  # [h, n_q, d]
    q = q_cent.repeat_interleave(block_q, 1).permute(1, 0, 2) + 0.3 * torch.randn(s, heads, d, generator=gen)
    v = torch.randn(s, heads, d, generator=gen)
    return tuple(t.unsqueeze(1).expand(s, b, heads, d).contiguous() for t in (q, k, v))


def test_predictor_loss_is_the_cosine_and_normalised_mse_mix():
    """The loss in its (2 - w)(1 - cos) form equals w * cosine distance + (1 - w) * squared distance
    of the L2-normalised rows, in value and in gradient, on random logits."""
    import torch.nn.functional as F

    from megatron_dsv.layers.predictor import LowRankPredictor

    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 5, 40, generator=gen, dtype=torch.float64) * 4
    pred = torch.randn(2, 3, 5, 40, generator=gen, dtype=torch.float64).requires_grad_()
    for w in (0.95, 0.3):
        mix = (w * (1 - F.cosine_similarity(pred, target, dim=-1))
               + (1 - w) * (F.normalize(pred, dim=-1) - F.normalize(target, dim=-1)).pow(2).sum(-1)).mean(dim=(0, 2))
        loss = LowRankPredictor.loss(pred, target, w)
        torch.testing.assert_close(loss, mix)
        grad_mix, = torch.autograd.grad(mix.sum(), pred)
        grad, = torch.autograd.grad(loss.sum(), pred)
        torch.testing.assert_close(grad, grad_mix)


def test_predictor_gram_loss_equals_the_loss_of_the_logits():
    """gram_loss (no logits built, gradients written out) equals loss() of the explicit predicted and true
    logits, in value and in autograd's gradients of wq and wk, on fresh random rows, keys and weights."""
    from megatron_dsv.layers.predictor import LowRankPredictor, key_gram

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    b, n, s, h, d, r, scale = 2, 7, 300, 3, 16, 4, 0.25
    q = torch.randn(b, n, h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, s, h, d, generator=gen, dtype=torch.float64) + torch.randn(h, d, generator=gen, dtype=torch.float64)
    wq, wk = (torch.randn(h, d, r, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    rows = q.permute(2, 0, 1, 3).contiguous()   # [h, b, rows, d], as the layer passes them
    gram = torch.einsum("bshd,bshe->bhde", k, k)
    for w, grad_scale in ((0.95, 1.0), (0.3, 0.7)):
        pred = torch.einsum("bnhr,bshr->bhns", torch.einsum("bnhd,hdr->bnhr", q, wq),
                            torch.einsum("bshd,hdr->bshr", k, wk))
        ref = LowRankPredictor.loss(pred, torch.einsum("bnhd,bshd->bhns", q, k) * scale, w)
        got, grad_q, grad_k = LowRankPredictor.gram_loss(rows, gram, wq.detach(), wk.detach(), scale, w,
                                                         grad_scale=grad_scale)
        torch.testing.assert_close(got, ref.detach())
        torch.testing.assert_close((grad_q, grad_k), torch.autograd.grad(ref.sum() * grad_scale, (wq, wk)))
    # Degenerate rows, where F.cosine_similarity clamps a norm at eps: a zero query row (both logit rows
    # zero) and a head whose predictor is zero (every predicted row zero)
    q_deg, wq_deg = q.clone(), wq.detach().clone()
    q_deg[1, 3] = 0.0
    wq_deg[2] = 0.0
    wq_deg.requires_grad_()
    pred = torch.einsum("bnhr,bshr->bhns", torch.einsum("bnhd,hdr->bnhr", q_deg, wq_deg),
                        torch.einsum("bshd,hdr->bshr", k, wk))
    ref_deg = LowRankPredictor.loss(pred, torch.einsum("bnhd,bshd->bhns", q_deg, k) * scale, 0.95)
    got_deg = LowRankPredictor.gram_loss(q_deg.permute(2, 0, 1, 3).contiguous(), gram, wq_deg.detach(),
                                         wk.detach(), scale, 0.95)
    torch.testing.assert_close(got_deg[0], ref_deg.detach())
    torch.testing.assert_close(got_deg[1:], torch.autograd.grad(ref_deg.sum(), (wq_deg, wk)))
    # float32, as the layer runs it (key_gram of the keys in the layer's [S, b, h, d] layout; on the GPU the
    # rows' terms from the Triton kernel): close to the float64 values
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got32 = LowRankPredictor.gram_loss(rows.float().to(dev), key_gram(k.transpose(0, 1).float().to(dev)),
                                       wq.detach().float().to(dev), wk.detach().float().to(dev), scale, w,
                                       grad_scale=grad_scale)
    torch.testing.assert_close(got32[0].double().cpu(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got32[1].double().cpu(), grad_q, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(got32[2].double().cpu(), grad_k, rtol=1e-3, atol=1e-5)


def test_triton_cosine_rows():
    """The row terms of gram_loss from the Triton kernel (tests/triton_cases/cosine_rows_cases.py)."""
    run_cases("cosine_rows_cases.py")


@pytest.mark.parametrize("estimator, chunk_bytes", [("lowrank", 256 << 20), ("pooled", 256 << 20), ("lowrank", 1)])
def test_a_profile_equals_the_profile_of_its_rows_materialised_logits(megatron_parallel, monkeypatch, estimator,
                                                                      chunk_bytes):
    """The layer's profile (block masses from row_block_mass, the token sparsity from one row per
    cube) equals profile_logits of all sampled rows' logits, and the recall that of
    the selection of their query blocks: on the GPU this runs the Triton kernel (strided keys).
    chunk_bytes 1: one head at a time."""
    monkeypatch.setattr(attention_module, "LOGIT_CHUNK_BYTES", chunk_bytes)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = core(DSVConfig(**SMALL, estimator=estimator), heads=2, d=32).to(device)
    gen = torch.Generator().manual_seed(3)
    s, b, h, block = 256, 2, 2, SMALL["block_q"]
    q = (torch.randn(s, b, h, d := 32, generator=gen) * 2).to(device)
    k = (torch.randn(s, b, h, 2 * d, generator=gen) * 2).to(device)[..., :d]    # a strided view
    rows = torch.arange(2 * block, 4 * block, device=device)                    # two whole cubes
    selection = layer._select(q, k, [3, 5])
    wq, wk = (w.detach().float() for w in (layer.predictor.wq, layer.predictor.wk))
    got = layer._profile_rows(q[rows], k, wq, wk, tuple(t.index_select(2, rows // block) for t in selection), 0)

    logits = torch.einsum("nbhd,sbhd->bhns", q[rows].float(), k.float()) * layer.softmax_scale
    q_est, k_est = q[rows].float().transpose(0, 1), k.float().transpose(0, 1)   # the pooled estimator's
    if estimator == "lowrank":
        q_est = torch.einsum("nbhd,hdr->bnhr", q[rows].float(), wq)
        k_est = torch.einsum("sbhd,hdr->bshr", k.float(), wk)
    prof = profile_logits(logits, block_q=block, theta=layer.cfg.theta, block_kv=SMALL["block_kv"],
                          cube_scores=layer._cube_scores(q_est, k_est))
    recall = selection_recall(prof.block_mass, *(t.index_select(2, rows // block) for t in selection))
    torch.testing.assert_close(got, profiled_columns({**prof._asdict(), "recall": recall}), rtol=1e-5, atol=1e-6)

    # A stage-1 profile picks its sampled cubes' blocks from its own estimator scores: the same statistics
    # as the selection of every query block through select_blocks.
    def stats(selection):
        return layer._sampled_rows_step(q, k, [0, 1], selection, train=False)
    budgets = DeviceBudgets()
    budgets.hold([3, 5], s // SMALL["block_kv"], q.device)
    own, selected = stats(budgets), stats(selection)
    assert own.keys() == selected.keys()
    for key, value in selected.items():
        torch.testing.assert_close(own[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the profile's copy to the host is asynchronous on the GPU")
def test_profiled_statistics_reach_the_host_mirror_at_its_next_read(megatron_parallel):
    """On the GPU a profile's statistics go to the host without waiting (the step's upkeep right after a
    replay may not wait for it): the step's bookkeeping leaves the copy under way, and the next read of
    the mirror holds exactly what the device holds, in every profile of both stages."""
    cfg = DSVConfig(**SMALL, stage1_min_steps=3, stage1_max_steps=3, profile_interval_stage1=1,
                    profile_interval_stage2=2, layer_sparsity_threshold=0.0, dispatch="density",
                    dense_fallback_density=1.0)
    layer = core(cfg, heads=4, d=64).cuda()
    ctl = layer.controller
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    profiled_in = []
    for _ in range(6):
        q, k, v = (torch.randn(512, 2, 4, 64, generator=gen).cuda() for _ in range(3))
        stage, profiles = ctl.host()["stage"], ctl.host()["profiles"]
        train_steps(layer, [(q, k, v)])
        if ctl._mirror()["profiles"] > profiles:
            profiled_in.append((stage, ctl._profile_copy is not None))
            mirror = ctl.host()
            assert ctl._profile_copy is None
            # repr: NaN (a head never profiled) equals NaN
            assert repr(mirror) == repr({**mirror, **ctl._profiled_on_host()})
    # (stage, copy under way after the step) of each profile: stage 1 profiles every step (0-2), stage 2 at
    # step 4; the switch to stage 2 (after step 2) reads the profile at once (its density starts the anneal)
    assert profiled_in == [(1, True), (1, True), (1, False), (2, True)], profiled_in
    # a state reload restarts the copy of the pending predictor loss (the next record need not wait either),
    # and that copy holds the loss the checkpoint pended (a value the live state does not hold)
    state = {name: t.clone() for name, t in ctl.state_dict().items()}
    state["loss_pending"].fill_(0.375)
    ctl.load_state_dict(state)
    assert isinstance(ctl._pending_loss, tuple)
    assert ctl._pending_value() == 0.375


@pytest.mark.parametrize("layout", ["packed", "sbh3d", "s3bhd"])
def test_key_gram_equals_the_float64_gram(layout, monkeypatch):
    """key_gram in the layer's [S, b, h, d] layout equals the float64 Gram of the same values, to float32
    accuracy: keys whose token stride is b x h times their head stride (packed, as rotary embeddings leave
    them, or a slice of a [S, b, h, 3d] fused projection) summed from partial products over interleaved
    parts of the keys, others (a slice of [S, 3, b, h, d]) in one product. On the GPU the keys are bf16,
    multiplied as they are (float32 accumulation and output)."""
    from megatron_dsv.layers import predictor

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    s, b, h, d = 3 * (predictor.GRAM_PART_KEYS + 1), 2, 3, 64   # 3 parts: S a multiple of 3, not of 2
    cuda = torch.cuda.is_available()
    dtype, dev = (torch.bfloat16, "cuda") if cuda else (torch.float32, "cpu")
    # Sliced on the device: a strided slice copied there would arrive packed.
    if layout == "s3bhd":
        k = torch.randn(s, 3, b, h, d, generator=gen).add_(0.5).to(dev, dtype)[:, 1]
    else:
        k = torch.randn(s, b, h, 3 * d, generator=gen).add_(0.5).to(dev, dtype)[..., d:2 * d]
        k = k.contiguous() if layout == "packed" else k
    bmm, products = predictor.bmm_float32, []
    monkeypatch.setattr(predictor, "bmm_float32", lambda x, y: products.append(x.shape[0]) or bmm(x, y))
    got = predictor.key_gram(k)
    assert products == [(1 if layout == "s3bhd" else 3) * b * h]
    k64 = k.double().transpose(0, 1)
    want = torch.einsum("bshd,bshe->bhde", k64, k64)
    assert got.dtype == torch.float32 and got.shape == (b, h, d, d)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)   # float32 sums of ~6k products


def test_predictor_learns_planted_pattern(megatron_parallel):
    gen = torch.Generator().manual_seed(0)
    cfg = DSVConfig(rank=4, block_q=32, cube=(2, 4, 4), block_kv=32, sample_stride=2, predictor_lr=3e-2,
                    stage1_min_steps=60, stage1_max_steps=60, profile_interval_stage1=5,
                    profile_interval_stage2=5, layer_sparsity_threshold=0.3, budget_floor=0.0)
    layer = core(cfg)
    first_loss = None
    for step in range(70):
        train_steps(layer, [planted_batch(gen)])
        m = layer.metrics()
        if first_loss is None and not math.isnan(m["predictor_loss"]):   # the EMA is a recorded step behind
            first_loss = m["predictor_loss"]
    assert m["stage"] == 2 and m["sparse"], m
    assert m["predictor_loss"] < 0.5 * first_loss, (first_loss, m["predictor_loss"])
    assert min(m["recall"]) > 0.9, m["recall"]
    assert max(m["budget"]) <= 0.5, m["budget"]  # it really is sparse: at most half the blocks
    assert min(m["block_sparsity"]) > 0.5


def test_a_step_with_overflowed_activations_leaves_the_predictor_and_its_statistics_finite(megatron_parallel):
    """One stage-1 step whose q and k hold an inf (a step the model's loss scaler would skip): the
    predictor's Adam step is skipped on the device (weights, moments and step count unchanged), its loss
    is not folded into the EMA and its profile not into the profiled EMAs; the next steps train as usual.
    Without the skip the weights turned NaN for good and stage 1 could end only at stage1_max_steps."""
    gen = torch.Generator().manual_seed(5)
    layer = core(DSVConfig(**SMALL, stage1_min_steps=50, stage1_max_steps=60, profile_interval_stage1=1))
    pred, ctl = layer.predictor, layer.controller
    bad = torch.randn(128, 1, 2, 32, generator=gen)
    bad[5, 0, 0, 0] = float("inf")
    before = {name: t.clone() for name, t in pred.state_dict().items()}
    train_steps(layer, [(bad, bad, bad)])
    assert all(torch.equal(t, before[name]) for name, t in pred.state_dict().items()), "the update was not skipped"
    train_steps(layer, [tuple(torch.randn(128, 1, 2, 32, generator=gen) for _ in range(3)) for _ in range(3)])
    assert int(pred.adam_step) == 3 and all(bool(torch.isfinite(w).all()) for w in (pred.wq, pred.wk))
    host = ctl.host()
    assert host["step"] == 4 and math.isfinite(host["loss_ema"]), host
    assert all(bool(torch.isfinite(c).all()) for c in profiled_columns(ctl)), "a non-finite profile was folded in"


def test_the_predictor_skips_updates_whose_gradients_are_not_finite():
    pred = LowRankPredictor(2, 16, 4, seed=1)
    grads = [torch.randn_like(pred.wq) for _ in range(2)]
    for poison in (float("nan"), float("inf")):
        state = {name: t.clone() for name, t in pred.state_dict().items()}
        grads[1][0, 3, 1] = poison
        pred.apply_grads(*grads, 1e-2)
        assert all(torch.equal(t, state[name]) for name, t in pred.state_dict().items()), poison
    grads[1][0, 3, 1] = 0.0
    pred.apply_grads(*grads, 1e-2)
    assert int(pred.adam_step) == 1 and not torch.equal(pred.wq, state["wq"])


# ------------------------------------------------------------------- checkpointing


def test_checkpoint_round_trip_resumes_stage_and_selection(megatron_parallel):
    gen = torch.Generator().manual_seed(1)
    cfg = DSVConfig(rank=4, block_q=32, cube=(2, 4, 4), block_kv=32, sample_stride=2, predictor_lr=3e-2,
                    stage1_min_steps=8, stage1_max_steps=8, profile_interval_stage2=3,
                    layer_sparsity_threshold=0.3, budget_floor=0.0)
    layer = core(cfg)
    train_steps(layer, [planted_batch(gen) for _ in range(10)])
    state = layer.state_dict()
    fresh = core(cfg)
    fresh.load_state_dict(state)
    assert fresh.controller.host() == layer.controller.host() and fresh.controller.in_stage2

    q, k, v = planted_batch(gen)
    n_kv = 256 // 32
    assert fresh.controller.budgets(n_kv) == layer.controller.budgets(n_kv)
    sel_a, sel_b = layer._select(q, k, layer.controller.budgets(n_kv)), fresh._select(q, k, fresh.controller.budgets(n_kv))
    assert all(torch.equal(a, b) for a, b in zip(sel_a, sel_b))
    assert torch.equal(layer(q, k, v, None), fresh(q, k, v, None))
    # Both continue identically, Adam moments included.
    batches = [planted_batch(gen) for _ in range(4)]
    train_steps(layer, batches)
    train_steps(fresh, batches)
    for (name, a), b in zip(layer.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    sharded = layer.sharded_state_dict(prefix="attn.")
    assert "attn.predictor.wq" in sharded and "attn.controller.stage" in sharded
    # A checkpoint from before the oracle sparsity existed still loads, with it unprofiled.
    older, full = core(cfg), core(cfg)
    older.load_state_dict({key: t for key, t in state.items() if not key.endswith("oracle_block_sparsity")})
    full.load_state_dict(state)
    assert older.controller.oracle_block_sparsity.isnan().all()
    without = (lambda host: {k: v for k, v in host.items() if k != "oracle_block_sparsity"})  # noqa: E731
    assert without(older.controller.host()) == without(full.controller.host())


# -------------------------------------------------------------- stage-2 computation


def test_stage2_output_is_block_sparse_attention_of_the_selection(megatron_parallel):
    gen = torch.Generator().manual_seed(2)
    cfg = DSVConfig(rank=4, block_q=32, cube=(2, 4, 4), block_kv=32, sample_stride=2,
                    stage1_min_steps=2, stage1_max_steps=2, layer_sparsity_threshold=0.3, budget_floor=0.0)
    layer = core(cfg)
    train_steps(layer, [planted_batch(gen) for _ in range(3)])
    q, k, v = planted_batch(gen)
    out = layer(q, k, v, None)
    assert layer.last_used_sparse
    budgets = layer.controller.budgets(8)
    assert max(budgets) < 8
    kv_idx, kv_cnt = layer._select(q, k, budgets)
    ref = block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q=32, block_kv=32, layout="sbhd",
                                 backend="reference")
    assert torch.equal(out, ref.reshape(out.shape))


# ----------------------------------------------------------- activation recompute


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("inputs", ["planted", "random"])
def test_recompute_trains_once_and_selects_consistently(megatron_parallel, reentrant, inputs):
    """Under activation recomputation of the core attention (reentrant or not) a layer trains as without it:
    every stage-2 step here learns, so the predictor changes at each, and a recomputed forward must select
    with the predictor the first one selected with (non-reentrant recomputation runs after the backward
    hook of the layer's output, where the predictor trains)."""
    gen = torch.Generator().manual_seed(3)
    # (random inputs: no layer would be sparse by its profile, so every layer runs sparse)
    forced = {} if inputs == "planted" else dict(predictor_lr=0.3, layer_sparsity_threshold=0.0,
                                                 dense_fallback_density=1.0)
    cfg = DSVConfig(**{**dict(rank=4, block_q=32, cube=(2, 4, 4), block_kv=32, sample_stride=2, predictor_lr=3e-2,
                              stage1_min_steps=3, stage1_max_steps=3, profile_interval_stage2=1,
                              layer_sparsity_threshold=0.3, budget_floor=0.0), **forced})
    plain, recomputed = core(cfg), core(cfg)
    batches = [planted_batch(gen) if inputs == "planted" else
               tuple(torch.randn(256, 1, 2, 32, generator=gen) for _ in range(3)) for _ in range(6)]
    select, read = recomputed._select, []
    recomputed._select = lambda *a, **kw: read.append(recomputed.predictor.wq.clone()) or select(*a, **kw)
    for q, k, v in batches:
        read.clear()
        grads = []
        for layer in (plain, recomputed):
            qi, ki, vi = (t.clone().requires_grad_() for t in (q, k, v))
            if layer is plain:
                y = layer(qi, ki, vi, None)
            else:
                y = checkpoint(lambda a, b_, c: layer(a, b_, c, None), qi, ki, vi, use_reentrant=reentrant)
            y.square().mean().backward()
            grads.append((qi.grad, ki.grad, vi.grad))
        for g0, g1 in zip(*grads):
            torch.testing.assert_close(g0, g1, rtol=0, atol=0)
        assert all(torch.equal(w, read[0]) for w in read[1:]), "a recomputed forward selected with another predictor"
    assert recomputed.controller.host()["step"] == 6 and recomputed.controller.in_stage2 and recomputed.last_used_sparse
    for (name, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_layer_run_twice_before_one_backward_learns_once(megatron_parallel):
    """Two forwards of one layer summed into one loss are one training step: one Adam step of the predictor
    (stage 1, where it trains in the backward) and one count, as for a single forward."""
    layer = core(DSVConfig(**SMALL, stage1_min_steps=100, stage1_max_steps=100))
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        q, k, v = (torch.randn(128, 1, 2, 32, generator=gen).requires_grad_() for _ in range(3))
        (layer(q, k, v, None).square().mean() + layer(2 * q, k, v, None).square().mean()).backward()
    assert layer.controller.host()["step"] == 2 and int(layer.predictor.adam_step) == 2


# ---------------------------------------------------------------------- bad input


def test_unsupported_configurations_raise(megatron_parallel):
    with pytest.raises(NotImplementedError, match="causal"):
        DSVDotProductAttention(tconfig(), 1, AttnMaskType.causal, "self", dsv_config=DSVConfig(**SMALL))
    with pytest.raises(NotImplementedError, match="grouped-query"):
        core(num_query_groups=1)
    with pytest.raises(NotImplementedError, match="dropout"):
        DSVDotProductAttention(tconfig(attention_dropout=0.1), 1, AttnMaskType.no_mask, "self")
    with pytest.raises(ValueError, match="self-attention"):
        DSVDotProductAttention(tconfig(), 1, AttnMaskType.no_mask, "cross")
    with pytest.raises(ValueError, match="dsv_config must be a DSVConfig"):
        DSVDotProductAttention(tconfig(), 1, AttnMaskType.no_mask, "self", dsv_config={"rank": 4})


@pytest.mark.parametrize("field, value", [("window_size", (8, 8)), ("softmax_type", "off-by-one"),
                                          ("softmax_type", "learnable"), ("qk_clip", True),
                                          ("log_max_attention_logit", True)])
def test_attention_variants_refused(megatron_parallel, field, value):
    """Settings of the softmax or its span that these core attentions do not compute are refused, by name (before,
    sliding windows and the other softmaxes silently ran plain full attention)."""
    import dataclasses

    if field not in {f.name for f in dataclasses.fields(TransformerConfig)}:
        pytest.skip(f"this Megatron-Core has no TransformerConfig.{field}")
    for cls in (DSVDotProductAttention, SDPADotProductAttention):
        with pytest.raises(NotImplementedError, match=f"TransformerConfig.{field}="):
            cls(tconfig(**{field: value}), 1, AttnMaskType.no_mask, "self")


def test_full_attention_windows_accepted(megatron_parallel):
    """A window of (-1, -1) is unbounded (full attention), and window_attn_skip_freq leaves some layers full: those
    layers build; the windowed ones are refused."""
    import dataclasses

    if "window_attn_skip_freq" not in {f.name for f in dataclasses.fields(TransformerConfig)}:
        pytest.skip("this Megatron-Core has no per-layer sliding windows")
    DSVDotProductAttention(tconfig(window_size=(-1, -1)), 1, AttnMaskType.no_mask, "self")
    every_second_full = tconfig(window_size=(8, 8), window_attn_skip_freq=2)
    DSVDotProductAttention(every_second_full, 2, AttnMaskType.no_mask, "self")
    with pytest.raises(NotImplementedError, match="sliding window"):
        DSVDotProductAttention(every_second_full, 1, AttnMaskType.no_mask, "self")


@pytest.mark.parametrize("graphs, refused", [
    (dict(cuda_graph_impl="local"), True),                                  # layerwise, whole layer
    (dict(cuda_graph_impl="local", cuda_graph_scope="full_iteration"), True),
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope="attn,mlp"), True),
    (dict(enable_cuda_graph=True), True),                                   # deprecated spellings
    (dict(external_cuda_graph=True), True),
    (dict(cuda_graph_impl="local", cuda_graph_scope="mlp"), True),          # local: the whole layer for "mlp" too
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope="mlp"), False),   # attention left out
    (dict(), False),
])
def test_megatron_cuda_graphs_over_the_attention_raise(megatron_parallel, graphs, refused):
    """Megatron's CUDA graphs would replay a DSV layer without its Python (stage, decisions and bookkeeping
    frozen at the capture): a config whose graphs cover the attention fails when the layer is built; graphs
    of the MLP alone are fine, and so is the dense core attention under any of them."""
    if refused:
        with pytest.raises(NotImplementedError, match="Megatron's CUDA graphs .cuda_graph_impl="):
            core(**graphs)
    else:
        assert core(**graphs).heads == 2
    SDPADotProductAttention(tconfig(**graphs), 1, AttnMaskType.no_mask, "self")


@pytest.mark.parametrize("config, refused", [
    (dict(cuda_graph_impl="local", cuda_graph_scope=["moe_router", "moe_preprocess"]), False),   # partial graphs
    (dict(cuda_graph_impl="local", cuda_graph_modules=["mamba"]), False),
    (dict(cuda_graph_impl="local", cuda_graph_modules=["moe"]), True),      # a MoE layer graphed whole
    (dict(cuda_graph_impl="local", cuda_graph_modules=[], inference_cuda_graph_scope="block"), False),
    (dict(cuda_graph_impl="local", cuda_graph_modules=[], inference_cuda_graph_scope="layer"), True),
    (dict(cuda_graph_impl="full_iteration", cuda_graph_modules=[]), True),  # Megatron-Core 0.19's spelling
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_modules=["moe_router"]), False),
])
def test_megatron_graph_regions_that_leave_the_attention_out(config, refused):
    """The regions whose graphs hold the attention, for configs TransformerConfig of this Megatron-Core may not
    build (MoE and Mamba regions need such layers; 0.19's field names)."""
    from types import SimpleNamespace

    from megatron_dsv.layers.megatron_cuda_graphs import megatron_graphs_over_attention

    assert (megatron_graphs_over_attention(SimpleNamespace(**config)) is not None) == refused


def test_unsupported_inputs_raise(megatron_parallel):
    layer = core()
    q = torch.randn(64, 1, 2, 32)
    with pytest.raises(NotImplementedError, match="packed sequences in qkv_format 'thd' or 'sbhd'"):
        layer(q, q, q, None, packed_seq_params=PackedSeqParams(qkv_format="bshd"))
    with pytest.raises(NotImplementedError, match="attention_bias"):
        layer(q, q, q, None, attention_bias=torch.zeros(1))
    with pytest.raises(NotImplementedError, match="attention_mask"):
        layer(q, q, q, torch.ones(1, 1, 64, 64, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="causal"):
        layer(q, q, q, None, attn_mask_type=AttnMaskType.causal)
    with pytest.raises(NotImplementedError, match="attn_mask_type='causal'"):   # a string, not the enum
        layer(q, q, q, None, attn_mask_type="causal")
    with pytest.raises(ValueError, match=r"query must be \[s, b, heads=2, d=32\]"):
        layer(torch.randn(64, 1, 4, 16), q, q, None)
    layer(q, q, q, torch.zeros(1, 1, 64, 64, dtype=torch.bool))  # an all-False mask masks nothing
    with pytest.raises(ValueError, match="dispatch='measured' needs GPU kernels on CUDA"):   # at the first call,
        core(DSVConfig(**SMALL, dispatch="measured"))(q, q, q, None)       # not at the first stage-2 step


def test_empty_mask_read_once_per_mask(megatron_parallel, monkeypatch):
    """An all-False attention_mask is read (a host sync on a GPU) once, not once per layer and call; a mask
    changed in place, or another mask, is read again."""
    from megatron_dsv.layers import attention_mask

    class CountingMask(torch.Tensor):
        reads = 0

        def any(self, *args, **kwargs):
            type(self).reads += 1
            return super().any(*args, **kwargs)

    monkeypatch.setattr(attention_mask._empty, "_cache", {})
    layers = [core(), SDPADotProductAttention(tconfig(), 1, AttnMaskType.no_mask, "self")]
    q = torch.randn(64, 1, 2, 32)
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.bool).as_subclass(CountingMask)
    for _ in range(2):
        for layer in layers:
            layer(q, q, q, mask)
    assert CountingMask.reads == 1
    mask[0, 0, 3, 5] = True   # masks something now: read again, refused
    with pytest.raises(NotImplementedError, match="attention_mask"):
        layers[0](q, q, q, mask)
    assert CountingMask.reads == 2
    mask[0, 0, 3, 5] = False
    other = torch.zeros(1, 1, 64, 64, dtype=torch.bool).as_subclass(CountingMask)
    for m in (mask, mask, other, other):
        layers[1](q, q, q, m)
    assert CountingMask.reads == 4
    with torch.inference_mode():   # no version counter there: read at every call
        frozen = torch.zeros(1, 1, 64, 64, dtype=torch.bool).as_subclass(CountingMask)
        for layer in layers:
            layer(q, q, q, frozen)
        assert CountingMask.reads == 6
        frozen_set = torch.ones(1, 1, 64, 64, dtype=torch.bool)
        with pytest.raises(NotImplementedError, match="attention_mask"):
            layers[0](q, q, q, frozen_set)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph capture needs a GPU")
def test_mask_refused_inside_capture():
    """Inside a CUDA graph capture a mask is not read (a sync) but refused, by name."""
    from megatron_dsv.layers.attention_mask import masks_nothing

    mask = torch.zeros(1, 1, 64, 64, dtype=torch.bool, device="cuda")
    masks_nothing(mask, "warm-up")   # found empty once: the capture must refuse it all the same
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="DSVDotProductAttention: an attention_mask tensor cannot be checked"):
        with torch.cuda.graph(graph):
            masks_nothing(mask, "DSVDotProductAttention")


def test_metrics_summary(megatron_parallel):
    block = TransformerBlock(tconfig(), get_dsv_layer_spec(DSVConfig(**SMALL)))
    x = torch.randn(64, 1, 64, requires_grad=True)
    block(x, attention_mask=None).sum().backward()
    m = dsv_metrics(block)
    assert m["summary"]["layers"] == 2 and m["summary"]["stage"] == 1
    assert len(m["layers"][0]["recall"]) == 2 and 0.0 <= m["summary"]["token_sparsity"] <= 1.0
    for layer in m["layers"]:  # no ranking needs fewer blocks than the one by true mass
        assert all(o >= b - 1e-6 for o, b in zip(layer["oracle_block_sparsity"], layer["block_sparsity"]))
    assert m["layers"][0]["attention_ms"] > 0


def test_dense_core_serves_cross_attention_and_dsv_rejects_it(megatron_parallel):
    cfg = tconfig()
    dense = SDPADotProductAttention(cfg, 1, AttnMaskType.no_mask, "cross")
    q, kv = torch.randn(64, 2, 2, 32), torch.randn(10, 2, 2, 32)
    out = dense(q, kv, kv, None)
    ref = torch.softmax(torch.einsum("sbhd,tbhd->bhst", q, kv) / 32 ** 0.5, -1)
    ref = torch.einsum("bhst,tbhd->sbhd", ref, kv).reshape(64, 2, 64)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="key has 10 tokens, query 64"):
        core()(q, kv, kv, None)


@pytest.mark.parametrize("name, value", [("stage", 0), ("stage", 3), ("step", -5)])
def test_loaded_stage_and_step_are_checked(megatron_parallel, name, value):
    """A state whose stage is not 1 or 2, or whose step is negative, is refused by name (before, a layer loaded
    with stage 0 or 3 stayed dense for good without a word)."""
    layer = core()
    state = layer.state_dict()
    state[f"controller.{name}"] = torch.full_like(state[f"controller.{name}"], value)
    with pytest.raises(ValueError, match=f"controller.{name}={value} must be"):
        core().load_state_dict(state)


def test_dsv_state_stays_float32_when_the_model_is_cast_to_bf16(megatron_parallel):
    """Megatron's Float16Module casts the whole model; the predictor, its Adam moments and the
    profiled EMAs must stay float32 (bf16 Adam moments and EMAs lose the small updates)."""
    block = TransformerBlock(tconfig(), get_dsv_layer_spec(DSVConfig(**SMALL))).bfloat16()
    layer = block.layers[0].self_attention.core_attention
    assert block.layers[0].self_attention.linear_qkv.weight.dtype == torch.bfloat16
    for name, t in [*layer.predictor.named_parameters(), *layer.predictor.named_buffers(),
                    *layer.controller.named_buffers()]:
        assert t.dtype in (torch.float32, torch.int64), (name, t.dtype)
    x = torch.randn(64, 1, 64, dtype=torch.bfloat16, requires_grad=True)
    block(x, attention_mask=None).float().sum().backward()
    assert layer.controller.host()["step"] == 1 and layer.predictor.adam_step.item() == 1
    assert layer.predictor.wq.dtype == torch.float32


def test_budgets_grow_at_once_and_shrink_along_the_ema():
    ctl = StageController(DSVConfig(ema_alpha=0.9), heads=2)
    ones = torch.ones(2)

    def profile(block_sparsity):
        ctl.record_profile({"token_sparsity": ones, "oracle_block_sparsity": ones, "recall": ones,
                            "block_sparsity": torch.tensor(block_sparsity), "mass_curve": ctl.mass_curve})
        return ctl.block_sparsity.tolist()

    assert profile([0.8, 0.8]) == pytest.approx([0.8, 0.8])
    assert profile([0.5, 0.9]) == pytest.approx([0.5, 0.81])       # head 0 needs more blocks: at once
    assert profile([0.9, 0.9]) == pytest.approx([0.54, 0.819])     # fewer blocks: along the EMA
    assert ctl.budgets(10) == [5, 2]
    assert ctl.recall.tolist() == [1.0, 1.0]                       # the other statistics are plain EMAs


class HostReads(TorchDispatchMode):
    """Records the ops run under it whose results the host reads (on the GPU, each waits for the device):
    .item() and friends, data-dependent sizes (unique, bincount, nonzero, boolean masks)."""

    NAMES = ("_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "bincount",
             "masked_select", "repeat_interleave")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masks = name.startswith("index") and isinstance(args[1], (list, tuple)) and any(
            t is not None and t.dtype == torch.bool for t in args[1])
        if name in self.NAMES or masks:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stage", [1, 2])
def test_profiling_steps_bookkeeping_reads_nothing_from_the_device(megatron_parallel, stage):
    """A profiling step's bookkeeping (_learn: predictor loss, selection, profile) groups the sampled rows
    into cubes by sizes the host knows and hands the selection its budgets on the device: on the GPU
    nothing in it waits for the device, so the host keeps queueing work. 240 tokens: the last cube
    (of 16 rows) is sampled too."""
    cfg = dict(sample_stride=1, profile_interval_stage1=1, profile_interval_stage2=1)
    layer = _stage2_layer(**cfg)[0] if stage == 2 else core(DSVConfig(**{**SMALL, **cfg}))
    learn, seen = layer._learn, []

    def watched(*args, **kwargs):
        with HostReads() as reads:
            learn(*args, **kwargs)
        seen.extend(reads.seen)

    layer._learn = watched
    profile_rows, budgets_seen = layer._profile_rows, []

    def profile_watched(q_rows, keys, wq, wk, selection, kv0):   # stage 1's profile selects its own cubes
        budgets_seen.append((selection, q_rows.device))
        return profile_rows(q_rows, keys, wq, wk, selection, kv0)

    layer._profile_rows = profile_watched
    profiles = layer.controller.host()["profiles"]
    gen = torch.Generator().manual_seed(4)
    train_steps(layer, [tuple(torch.randn(240, 1, 2, 32, generator=gen) for _ in range(3)) for _ in range(2)])
    assert layer.controller.host()["profiles"] == profiles + 2 and layer.controller.host()["stage"] == stage
    assert layer.last_used_sparse == (stage == 2)
    assert not seen, seen
    if stage == 1:  # the budgets reach the profile's selection already on the device (a list would be copied there)
        assert len(budgets_seen) == 2 and all(
            isinstance(b, DeviceBudgets) and b.tensor.device == device and b.k_max >= int(b.tensor.max())
            for b, device in budgets_seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need the GPU")
def test_graphed_sparse_attention_matches_eager(megatron_parallel):
    """Stage-2 training steps replayed from CUDA graphs give the eager layer's outputs and gradients
    bit for bit (the kernels are deterministic), also after the predictor is fine-tuned in place."""
    cfg = DSVConfig(block_q=64, cube=(4, 4, 4), block_kv=64, stage1_min_steps=1, stage1_max_steps=1,
                    layer_sparsity_threshold=0.0, budget_floor=0.0, dispatch="density", dense_fallback_density=1.0,
                    profile_interval_stage2=6, budget_policy="theta")  # budgets from block_sparsity, set below
    layers = [core(c, heads=4, d=64).cuda() for c in (cfg, cfg.replace(cuda_graphs=False))]
    gen = torch.Generator().manual_seed(0)
    graphs = []
    for step in range(12):
        q, k, v = (torch.randn(1024, 2, 4, 64, generator=gen).cuda().bfloat16() for _ in range(3))
        grad = torch.randn(1024, 2, 256, generator=gen).cuda().bfloat16()
        results = []
        for layer in layers:
            # Stage 2 with per-head budgets from a profile (step 1: 8, 5, 4, 2 of 16 blocks; captured at
            # step 3); at step 4 new budgets of the same k_max (8), which the graphs read from the device.
            sparsity = {1: [0.5, 0.7, 0.8, 0.9], 4: [0.6, 0.75, 0.85, 0.9]}.get(step)
            if sparsity is not None:
                state = layer.controller.state_dict()
                state["block_sparsity"].copy_(torch.tensor(sparsity))
                layer.controller.load_state_dict(state)
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            out = layer(qq, kk, vv, None)
            out.backward(grad)
            results.append((out, qq.grad, kk.grad, vv.grad))
        if step == 0:  # stage 1: dense attention, whose backward is not bitwise reproducible
            continue
        for i, (got, want) in enumerate(zip(*results)):
            assert torch.equal(got, want), (step, i, layers[0].graphed._graphed is not None,
                                            float((got.float() - want.float()).abs().max()))
        graphs.append((layers[0].graphed._graphed, layers[0].device_budgets.values))
    assert layers[0].last_used_sparse and layers[0].graphed._graphed is not None
    (captured, before), (_, after), (replayed, _) = graphs[2], graphs[3], graphs[4]   # steps 3, 4, 5
    assert captured is not None and replayed is captured and before == (8, 5, 4, 2) and after == (7, 4, 3, 2)
    assert layers[0].predictor.wq.equal(layers[1].predictor.wq)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need the GPU")
def test_graphed_predictor_training_matches_eager(megatron_parallel, monkeypatch):
    """Eager stage-1 steps whose predictor training is replayed from a CUDA graph (graphed_upkeep.py) leave
    the predictor, its Adam moments and the controller's state bit for bit as eager training does, with
    profile steps (eager) in between and keys sliced from a fused projection (strided)."""
    cfg = DSVConfig(block_q=64, cube=(4, 4, 4), block_kv=64, sample_stride=4, stage1_min_steps=100,
                    stage1_max_steps=100, profile_interval_stage1=5)
    layers = [core(c, heads=4, d=64).cuda() for c in (cfg, cfg.replace(cuda_graphs=False))]
    from megatron_dsv.layers import graphed_upkeep as gu

    captures, capture = [], gu.GraphedUpkeep._capture
    monkeypatch.setattr(gu.GraphedUpkeep, "_capture", staticmethod(lambda *a: captures.append(1) or capture(*a)))
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        qkv = torch.randn(1024, 2, 4, 3 * 64, generator=gen).cuda().bfloat16()
        grad = torch.randn(1024, 2, 256, generator=gen).cuda().bfloat16()
        for layer in layers:
            fused = qkv.clone().requires_grad_()
            layer(*fused.split(64, dim=-1), None).backward(grad)
        states = [{**layer.predictor.state_dict(), **layer.controller.state_dict()} for layer in layers]
        for name, want in states[1].items():
            torch.testing.assert_close(states[0][name], want, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"step {step}, {name}: {m}")
    # Steps 0, 5 and 10 profile (eagerly); the other nine share one key: captured at the third, replayed since.
    assert len(captures) == 1 and len(layers[0].graphed_upkeep._graphs) == 1
    assert not layers[1].graphed_upkeep._graphs and not layers[1].graphed_upkeep._seen
    assert int(layers[0].controller.step) == 12 and not layers[0].controller.in_stage2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the upkeep's own stream is a CUDA stream")
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphed_upkeep", "launched_upkeep"])
def test_upkeep_on_its_own_stream_trains_as_on_the_step_stream(megatron_parallel, monkeypatch, cuda_graphs):
    """Stage-1 steps whose predictor training and profiles run on the upkeep stream (upkeep_stream.py, beside
    the backward) leave predictor, Adam moments and controller state bit for bit as on the step's own
    stream, for two layers in one backward (the second forks while the first's upkeep may still run), the
    inputs freed by the backward as it goes."""
    from megatron_dsv.layers import upkeep_stream

    cfg = DSVConfig(block_q=64, cube=(4, 4, 4), block_kv=64, sample_stride=4, stage1_min_steps=100,
                    stage1_max_steps=100, profile_interval_stage1=5, cuda_graphs=cuda_graphs)
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(upkeep_stream, "ENABLED", enabled)
        pair = [core(cfg, heads=4, d=64).cuda() for _ in range(2)]
        gen = torch.Generator().manual_seed(0)
        for _ in range(8):
            qkv = torch.randn(1024, 2, 4, 3 * 64, generator=gen).cuda().bfloat16().requires_grad_()
            out = pair[0](*qkv.split(64, dim=-1), None)
            q2 = out.view(1024, 2, 4, 64).repeat(1, 1, 1, 3)   # the second layer reads the first's output
            pair[1](*q2.split(64, dim=-1), None).float().square().sum().backward()
        runs.append([{**layer.predictor.state_dict(), **layer.controller.state_dict()} for layer in pair])
        assert not upkeep_stream._held   # joined at the end of every backward
    for got, want in zip(*runs):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert int(runs[0][0]["step"]) == 8 and not torch.equal(runs[0][0]["wq"], runs[0][0]["wk"])


def test_unsupported_head_dim_fails_when_the_layer_is_built(megatron_parallel):
    """A head dim the Triton kernels lack fails at construction, not at the first stage-2 step."""
    with pytest.raises(NotImplementedError, match="head dims"):
        core(DSVConfig(**SMALL, backend="triton"), d=48)
    assert core(DSVConfig(**SMALL, backend="reference"), d=48).head_dim == 48


@pytest.mark.parametrize("field, mode, expected", [(True, False, True), (False, False, False), (False, True, True)])
def test_deterministic_kernels_follow_config_and_megatron_deterministic_mode(megatron_parallel, monkeypatch, field,
                                                                            mode, expected):
    """The sparse attention is asked for reproducible kernels where DSVConfig.deterministic_backward or
    Megatron's deterministic_mode says so (auto then keeps to Triton's)."""
    import megatron_dsv.layers.attention as attention

    seen = []
    real = attention.block_sparse_attention
    monkeypatch.setattr(attention, "block_sparse_attention", lambda *a, **kw: seen.append(kw["deterministic"]) or real(*a, **kw))
    layer = core(DSVConfig(**SMALL, deterministic_backward=field), deterministic_mode=mode)
    q, k, v = (torch.randn(64, 1, 2, 32) for _ in range(3))
    layer._sparse_attention(q, k, v, layer._select(q, k, [1, 2]))
    assert seen == [expected]


class _FakeGraph:
    """What a CUDA graph's replay does, on CPU: the captured work again, on the static inputs, into the same
    output tensors."""

    def __init__(self, fn, inputs, out):
        self.fn, self.inputs, self.out = fn, inputs, out

    def replay(self):
        for name, val in self.fn(*self.inputs).items():
            self.out[name].copy_(val)


def _fake_upkeep_capture(monkeypatch, captures: list) -> None:
    from megatron_dsv.layers import graphed_upkeep as gu

    def capture(fn, q, k):   # as the real one: fn runs once (the warm-up); the capture runs nothing
        captures.append(fn)
        inputs = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t) for t in (q, k))
        out = fn(*inputs)
        static = {name: torch.empty_like(t) for name, t in out.items()}
        return out, (inputs, _FakeGraph(fn, inputs, static), static)

    monkeypatch.setattr(gu.GraphedUpkeep, "_capture", staticmethod(capture))


def test_graphed_upkeep_keys_captures_and_releases(monkeypatch):
    """GraphedUpkeep's bookkeeping, with the CUDA capture replaced by one that replays on CPU: a key is captured
    at its STABLE_CALLS-th call, also when two keys alternate (a sample plan that changes with the step), and
    never again; each call copies its inputs into the static buffers and returns what fn gives on them; at most
    MAX_GRAPHS keys keep a graph (the least recently used goes); release() frees all."""
    from megatron_dsv.layers import graphed_upkeep as gu

    captures = []
    _fake_upkeep_capture(monkeypatch, captures)
    upkeep = gu.GraphedUpkeep()
    fn = lambda q, k: {"s": (q * k).sum(0, keepdim=True), "m": q.max(0, keepdim=True).values}  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    for call in range(12):
        q, k = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
        got = upkeep(("plan", call % 2), fn, q, k)
        want = fn(q, k)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), call
        assert len(captures) == (0 if call < 2 * gu.STABLE_CALLS - 2 else 1 if call == 2 * gu.STABLE_CALLS - 2 else 2)
    for key in range(gu.MAX_GRAPHS):   # MAX_GRAPHS more keys: the two plans' graphs are the oldest and go
        for _ in range(gu.STABLE_CALLS):
            upkeep(("shape", key), fn, q, k)
    assert list(upkeep._graphs) == [("shape", key) for key in range(gu.MAX_GRAPHS)]
    upkeep.release()
    assert not upkeep._graphs and not upkeep._seen


@pytest.mark.parametrize("replicas", [False, True], ids=["adam_in_graph", "adam_after_reduction"])
def test_graphed_upkeep_path_trains_the_predictor_as_eager_steps(megatron_parallel, monkeypatch, replicas):
    """The layer's use of the graphed upkeep, on CPU with replays simulated (the real capture is checked on the
    GPU: test_graphed_predictor_training_matches_eager): over stage-1 steps with a profile step in between and
    keys sliced from a fused projection, a layer that replays its upkeep keeps predictor, Adam moments and
    controller equal to eager training's, so nothing holds a replay's outputs past the next replay. Without
    replicas the graph holds the Adam step; with them (here one rank playing several) it runs after the
    reduction over them, outside the graph."""
    from megatron_dsv.layers import graphed_upkeep as gu

    captures = []
    _fake_upkeep_capture(monkeypatch, captures)
    monkeypatch.setattr(gu.GraphedUpkeep, "fits", staticmethod(lambda q: True))
    monkeypatch.setattr(DSVDotProductAttention, "_has_replicas", lambda self: replicas)
    cfg = DSVConfig(**{**SMALL, "sample_stride": 2}, stage1_min_steps=100, stage1_max_steps=100,
                    profile_interval_stage1=5)
    layers = [core(c) for c in (cfg, cfg.replace(cuda_graphs=False))]
    gen = torch.Generator().manual_seed(0)
    for step in range(9):
        qkv = torch.randn(160, 1, 2, 3 * 32, generator=gen)   # 5 query blocks: the sample plan alternates
        for layer in layers:
            fused = qkv.clone().requires_grad_()
            layer(*fused.split(32, dim=-1), None).square().mean().backward()
        states = [{**layer.predictor.state_dict(), **layer.controller.state_dict()} for layer in layers]
        for name, want in states[1].items():
            torch.testing.assert_close(states[0][name], want, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"step {step}, {name}: {m}")
    # Profiles at steps 0 and 5; the others alternate between 3 and 2 sampled cubes: two keys, captured once each.
    assert len(captures) == 2 and len(layers[0].graphed_upkeep._graphs) == 2
    assert not layers[1].graphed_upkeep._graphs


def test_layer_releases_its_upkeep_graphs_when_they_cannot_replay(megatron_parallel):
    """The eager upkeep's graphs are freed once the layer is in stage 2 (the predictor then trains only at
    profile steps, which run eagerly) and when a whole training step is captured (step_graph.capturing)."""
    from megatron_dsv.layers.step_graph import capturing

    def layer_holding_a_graph(**kw):
        layer = core(DSVConfig(**SMALL, stage1_min_steps=2, stage1_max_steps=2, **kw))
        layer.graphed_upkeep._graphs["key"] = ("static inputs", "graph", {})
        return layer

    layer = layer_holding_a_graph()
    q, k, v = (torch.randn(128, 1, 2, 32) for _ in range(3))
    train_steps(layer, [(q, k, v)])
    assert layer.graphed_upkeep._graphs and not layer.controller.in_stage2   # stage 1: kept
    train_steps(layer, [(q, k, v)])
    assert layer.controller.in_stage2 and not layer.graphed_upkeep._graphs
    layer = layer_holding_a_graph()
    train_steps(layer, [(q, k, v)])   # a first step: capturing() needs the shape of the last one
    with capturing(layer):
        assert not layer.graphed_upkeep._graphs


def test_dropped_graphs_are_collected(monkeypatch):
    """A graph dropped for a new key is freed (its memory pool with it) within COLLECT_EVERY drops, although
    make_graphed_callables' wrapper is cyclic garbage that reference counting alone never frees."""
    import gc
    import weakref

    from megatron_dsv.layers import graphed as graphed_mod

    made = []

    class Cyclic:   # stands in for make_graphed_callables' result: callable, and a reference cycle
        def __init__(self):
            self.me = self

        def __call__(self, q, k, v):
            return q * 1.0

    def fake_make(fn, samples):
        obj = Cyclic()
        made.append(weakref.ref(obj))
        return obj

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make)
    monkeypatch.setattr(graphed_mod, "_dropped", 0)
    gc.disable()   # only the forced collections may free them
    try:
        runner = graphed_mod.GraphedSparseAttention()
        q = torch.randn(4, requires_grad=True)
        for key in range(graphed_mod.COLLECT_EVERY + 1):
            for _ in range(graphed_mod.STABLE_CALLS):
                runner(key, lambda q, k, v: q * 1.0, q, q, q).sum().backward()
        assert len(made) == graphed_mod.COLLECT_EVERY + 1
        assert all(ref() is None for ref in made[:-1]), "dropped graphs still alive"
        assert made[-1]() is not None
    finally:
        gc.enable()


def _stage2_layer(**overrides):
    torch.manual_seed(0)   # the predictor's initial weights: every call builds the same layer
    cfg = DSVConfig(**{**dict(SMALL, stage1_min_steps=1, stage1_max_steps=1, layer_sparsity_threshold=0.0,
                              budget_floor=0.0, dense_fallback_density=1.0, backend="reference"), **overrides})
    layer = core(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randn(256, 1, 2, 32, generator=gen) for _ in range(3)) for _ in range(3)]
    train_steps(layer, batches)
    assert layer.controller.host()["stage"] == 2
    return layer, batches[0]


def test_stage2_forward_compiles_fullgraph(megatron_parallel):
    """Evaluation in stage 2 (selection + sparse attention) traces whole under torch.compile(fullgraph=True):
    the forward timer, the predictor's cast cache and the reference op's value checks stay out of traced
    code, and the compiled layer gives the eager result."""
    torch._dynamo.reset()
    layer, (q, k, v) = _stage2_layer()
    layer.eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(q, k, v, None)
        assert layer.last_used_sparse
        want = layer(q, k, v, None)
    assert torch.equal(got, want)


def test_stage2_training_step_compiles_without_per_step_recompiles(megatron_parallel):
    """Stage-2 training steps under torch.compile: selection and attention in one graph, breaks only around
    the per-step host decisions and the once-per-backward bookkeeping (a host callback); twelve steps with
    steady budgets compile a bounded number of graphs (not one per step, as guards on the step counter
    did); outputs and gradients equal eager."""
    torch._dynamo.reset()
    layer, (q, k, v) = _stage2_layer()
    explained = torch._dynamo.explain(layer)(*(t.clone().requires_grad_() for t in (q, k, v)), None)
    # (10 breaks before: the forward timer's clock, the cast cache's pointer check, the op's value checks)
    assert explained.graph_break_count <= 3, explained.graph_break_count
    torch._dynamo.reset()
    compiles = []

    def counting(gm, inputs):
        compiles.append(len(gm.graph.nodes))
        return gm.forward

    steady = torch.compile(_stage2_layer()[0], backend=counting)
    gen = torch.Generator().manual_seed(9)
    for _ in range(12):
        qq, kk, vv = (torch.randn(256, 1, 2, 32, generator=gen).requires_grad_() for _ in range(3))
        steady(qq, kk, vv, None).square().mean().backward()
    assert len(compiles) <= 6, len(compiles)
    compiled = torch.compile(_stage2_layer()[0], backend="aot_eager")
    results = []
    for fn in (compiled, _stage2_layer()[0]):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv, None)
        out.square().mean().backward()
        results.append((out, qq.grad, kk.grad, vv.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
