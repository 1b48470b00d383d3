"""Packed variable-length clips (THD): each clip computes exactly what it would alone.

float64 on CPU with the reference backend; the Triton kernels' packed paths are compared with the
reference in tests/triton_cases.
"""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dsv import DSVConfig
from megatron_dsv.layers import DSVDotProductAttention, SDPADotProductAttention
from megatron_dsv.ops import Segments, block_sparse_attention, dense_attention, select_blocks
from megatron_dsv.video import PackedClips

HEADS, D = 2, 16
# backend "reference" (as "auto" resolves on CPU): on a GPU machine "auto" would build the layer for the
# Triton kernels, which refuse head dim 16.
CFG = dict(rank=4, block_q=32, cube=(2, 4, 4), block_kv=16, sample_stride=2, budget_floor=0.0,
           layer_sparsity_threshold=0.0, dense_fallback_density=1.0, backend="reference")
# 1-5 clips of different (T, H, W), tiny ones (fewer tokens than one block) included.
CLIP_SETS = [
    [(2, 4, 8)],
    [(4, 8, 8), (1, 2, 3)],
    [(2, 6, 5), (3, 4, 4), (1, 1, 1)],
    [(4, 4, 4), (2, 3, 7), (1, 4, 4), (5, 2, 6), (2, 2, 2)],
]


def core(cls=DSVDotProductAttention, **cfg):
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * D, num_attention_heads=HEADS,
                               use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0)
    kw = {"dsv_config": DSVConfig(**{**CFG, **cfg})} if cls is DSVDotProductAttention else {}
    return cls(config, layer_number=1, attn_mask_type=AttnMaskType.no_mask, attention_type="self", **kw)


def force_stage2(layer, sparsity):
    state = layer.controller.state_dict()
    state["stage"].fill_(2)
    state["step"].fill_(1)  # not a profiling step
    state["block_sparsity"].copy_(torch.tensor(sparsity))
    layer.controller.load_state_dict(state)


def clip_inputs(lengths, gen):
    return [[torch.randn(n, HEADS, D, generator=gen, dtype=torch.float64) for _ in range(3)] for n in lengths]


def packed_qkv(clips: PackedClips, per_clip):
    """thd q, k, v [total, heads, d] of clips given in cube order (pack() expects raster order)."""
    raster = [[layout.from_cube(t) for t in qkv] for layout, qkv in zip(clips.layouts, per_clip)]
    return [clips.pack([r[i] for r in raster]).requires_grad_() for i in range(3)]


def run_alone(layer, q, k, v):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = layer(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), None).squeeze(1)
    return out, torch.autograd.grad(out.square().sum(), (q, k, v))


# ------------------------------------------------------------------------------ ops


def test_segments_from_cu_seqlens_and_bad_offsets():
    seg = Segments.from_cu_seqlens(torch.tensor([0, 5, 12]), torch.tensor([0, 32, 64]))
    assert seg.lengths == (5, 7) and seg.starts == (0, 32) and seg.total == 64 and seg.is_padded
    assert Segments([5, 7], align=32) == seg
    with pytest.raises(ValueError, match="not decrease"):
        Segments.from_cu_seqlens([0, 9, 4])
    with pytest.raises(ValueError, match="at least its cu_seqlens length"):
        Segments.from_cu_seqlens([0, 5, 12], [0, 4, 12])
    for bad in (torch.tensor([[0, 5, 12]]), torch.tensor([0.0, 5.0, 12.0]), [0, 5.5, 12], "0,5,12"):
        with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int tensor"):
            Segments.from_cu_seqlens(bad)
    with pytest.raises(ValueError, match="multiple of max"):
        Segments([5, 7]).check(12, 32, 16)
    with pytest.raises(ValueError, match="segments describe 64 tokens"):
        seg.check(60, 32, 16)


def test_packed_reference_ops_equal_each_clip_alone():
    gen = torch.Generator().manual_seed(0)
    seg = Segments([40, 7, 70], align=32)
    q, k, v = (torch.randn(1, seg.total, HEADS, D, generator=gen, dtype=torch.float64) for _ in range(3))
    budgets = torch.tensor([[1, 1, 2], [3, 1, 5]])
    kv_idx, kv_cnt = select_blocks(q[..., :4], k[..., :4], budgets, block_q=32, block_kv=16, segments=seg)
    out = block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q=32, block_kv=16, segments=seg)
    for c, (start, n) in enumerate(zip(seg.starts, seg.lengths)):
        q_lo, q_hi = seg.block_range(c, 32)
        kv_lo = seg.block_range(c, 16)[0]
        sl = slice(start, start + n)
        idx, cnt = select_blocks(q[:, sl, :, :4], k[:, sl, :, :4], budgets[:, c], block_q=32, block_kv=16)
        assert torch.equal(kv_cnt[:, :, q_lo:q_hi], cnt)
        assert torch.equal(kv_idx[:, :, q_lo:q_hi, :idx.shape[-1]], torch.where(idx >= 0, idx + kv_lo, -1))
        alone = block_sparse_attention(q[:, sl], k[:, sl], v[:, sl], idx, cnt, block_q=32, block_kv=16)
        assert torch.equal(out[:, sl], alone)
    assert not out[:, ~seg.token_valid("cpu")].any()
    dense = dense_attention(q, k, v, segments=seg)
    for start, n in zip(seg.starts, seg.lengths):
        sl = slice(start, start + n)
        torch.testing.assert_close(dense[:, sl], dense_attention(q[:, sl], k[:, sl], v[:, sl]), rtol=0, atol=1e-12)
    # A list reaching into another clip is rejected by the reference's checks.
    kv_idx[0, 0, 0, 0] = seg.block_range(2, 16)[0]
    with pytest.raises(ValueError, match="outside its query block's clip"):
        block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q=32, block_kv=16, segments=seg)


# ---------------------------------------------------------------------------- layer


@pytest.mark.parametrize("grids", CLIP_SETS, ids=lambda g: f"{len(g)}clips")
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("align", [1, 32])
def test_packed_layer_equals_each_clip_alone(megatron_parallel, grids, stage, align):
    """Forward and input gradients of a packed batch equal each clip run alone through the same layer,
    in stage 1 (dense) and stage 2 (block-sparse, per-clip budgets), with the clips aligned by the
    packer (no copy in the layer) or not (the layer aligns them)."""
    layer = core().double()
    if stage == 2:
        force_stage2(layer, [0.6, 0.8])
    clips = PackedClips(grids, cube=CFG["cube"], align=align)
    gen = torch.Generator().manual_seed(len(grids))
    per_clip = clip_inputs(clips.lengths, gen)
    q, k, v = packed_qkv(clips, per_clip)
    out = layer(q, k, v, None, packed_seq_params=clips.packed_seq_params())
    assert out.shape == (clips.total, HEADS * D)
    assert layer.last_used_sparse == (stage == 2)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    valid = clips.valid()
    assert not out[~valid].any() and all(not g[~valid].any() for g in grads)
    for c, (start, n) in enumerate(zip(clips.segments.starts, clips.lengths)):
        want, want_grads = run_alone(layer, *per_clip[c])
        torch.testing.assert_close(out[start:start + n].view(n, HEADS, D), want.view(n, HEADS, D),
                                   rtol=0, atol=1e-12)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g[start:start + n], w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("stage", [1, 2])
def test_no_attention_across_clips(megatron_parallel, stage):
    """Changing one clip leaves every other clip's output bit-identical."""
    layer = core()
    if stage == 2:
        force_stage2(layer, [0.7, 0.9])
    clips = PackedClips(CLIP_SETS[3], cube=CFG["cube"])
    q, k, v = (torch.randn(clips.total, HEADS, D) for _ in range(3))
    params = clips.packed_seq_params()
    with torch.no_grad():
        before = layer(q, k, v, None, packed_seq_params=params)
        start, n = clips.segments.starts[1], clips.lengths[1]
        for t in (q, k, v):
            t[start:start + n] += torch.randn(n, HEADS, D)
        after = layer(q, k, v, None, packed_seq_params=params)
    changed = torch.zeros(clips.total, dtype=torch.bool)
    changed[start:start + n] = True
    assert torch.equal(before[~changed], after[~changed])
    assert not torch.equal(before[changed], after[changed])


def test_sbhd_form_and_dense_layer(megatron_parallel):
    """Megatron's sbhd-with-cu_seqlens form gives the thd result; the dense core attention packs too."""
    clips = PackedClips(CLIP_SETS[2], cube=CFG["cube"])
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(clips.total, HEADS, D, generator=gen) for _ in range(3))
    thd = clips.packed_seq_params()
    sbhd = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=thd.cu_seqlens_q, cu_seqlens_kv=thd.cu_seqlens_kv)
    for layer in (core(), core(SDPADotProductAttention)):
        a = layer(q, k, v, None, packed_seq_params=thd)
        b = layer(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), None, packed_seq_params=sbhd)
        assert a.shape == (clips.total, HEADS * D) and b.shape == (clips.total, 1, HEADS * D)
        assert torch.equal(a, b.squeeze(1))
    dense = core(SDPADotProductAttention)(q, k, v, None, packed_seq_params=thd)
    start, n = clips.segments.starts[0], clips.lengths[0]
    alone = dense_attention(q[start:start + n, None], k[start:start + n, None], v[start:start + n, None],
                            layout="sbhd")
    torch.testing.assert_close(dense[start:start + n], alone.reshape(n, -1))


def test_training_on_packed_clips_learns_per_clip(megatron_parallel):
    """A single clip trains the predictor identically packed (thd, unaligned: the layer pads it) or not;
    several clips give a finite loss and profile, and the predictor moves."""
    gen = torch.Generator().manual_seed(7)
    clips = PackedClips([(3, 6, 5)], cube=CFG["cube"])
    packed, plain = core(profile_interval_stage1=1), core(profile_interval_stage1=1)
    for _ in range(3):
        q, k, v = (torch.randn(clips.total, HEADS, D, generator=gen) for _ in range(3))
        for layer, params in ((packed, clips.packed_seq_params()), (plain, None)):
            qi, ki, vi = (t.clone().requires_grad_() for t in (q, k, v))
            if params is None:
                qi, ki, vi = (t.unsqueeze(1) for t in (qi, ki, vi))
            layer(qi, ki, vi, None, packed_seq_params=params).square().mean().backward()
    for (name, a), b in zip(packed.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)

    many = PackedClips(CLIP_SETS[3], cube=CFG["cube"], align=32)
    layer = core(profile_interval_stage1=1)
    w0 = layer.predictor.wq.clone()
    q, k, v = (torch.randn(many.total, HEADS, D, generator=gen).requires_grad_() for _ in range(3))
    layer(q, k, v, None, packed_seq_params=many.packed_seq_params()).square().mean().backward()
    m = layer.metrics()
    # One step: its loss is recorded, and enters the EMA (predictor_loss) at the next record.
    assert m["step"] == 1 and 0 < float(layer.controller.state_dict()["loss_pending"]) < 2
    assert all(0 <= x <= 1 + 1e-6 for x in m["block_sparsity"] + m["recall"])
    assert not torch.equal(w0, layer.predictor.wq)


def test_bad_packed_params_raise(megatron_parallel):
    layer = core()
    clips = PackedClips(CLIP_SETS[1], cube=CFG["cube"])
    q = torch.randn(clips.total, HEADS, D)
    good = clips.packed_seq_params()
    cu = good.cu_seqlens_q
    cases = [
        (PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, cu[1] + 3, cu[1], cu[2]])), "not decrease"),
        (PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu[:-1]), f"describes {int(cu[1])}"),
        (PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu[:2]), "sequences"),
    ]
    for bad in (cu.view(1, -1), cu.float(), cu.tolist()):   # a batch dim left in, floats, a Python list
        cases.append((PackedSeqParams(qkv_format="thd", cu_seqlens_q=bad), "cu_seqlens_q must be a 1-D int tensor"))
    wrong_shapes = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.clone())
    wrong_shapes.dsv_clips = PackedClips([(1, 2, 3), (4, 8, 8)], cube=CFG["cube"])  # same total, other order
    cases.append((wrong_shapes, "dsv_clips has clips of"))
    other_cube = PackedClips(CLIP_SETS[1], cube=(4, 4, 2)).packed_seq_params()   # same lengths, other token order
    cases.append((other_cube, r"cubes of \(4, 4, 2\) but DSVConfig.cube is \(2, 4, 4\)"))
    core(SDPADotProductAttention)(q, q, q, None, packed_seq_params=other_cube)   # dense attention: any order
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            layer(q, q, q, None, packed_seq_params=params)
    with pytest.raises(ValueError, match=r"\[t, heads, d\]"):
        layer(q.unsqueeze(1), q.unsqueeze(1), q.unsqueeze(1), None, packed_seq_params=good)


def test_packed_clips_round_trip_and_positions():
    clips = PackedClips([(2, 4, 8), (1, 3, 5)], cube=(2, 4, 4), align=32)
    xs = [torch.randn(n, 3) for n in clips.lengths]
    packed = clips.pack(xs)
    assert packed.shape == (clips.total, 3) and clips.total == 96
    assert not packed[~clips.valid()].any()
    for x, y in zip(xs, clips.unpack(packed)):
        assert torch.equal(x, y)
    pos = clips.positions()
    assert torch.equal(pos[:64], clips.layouts[0].positions()) and torch.equal(pos[64:79], clips.layouts[1].positions())


def test_cp_planner_weighs_each_head_by_its_per_clip_work():
    """Under context parallelism a head's predicted work is its real work on the packing: the sum over
    clips of query blocks x that clip's budget, as one budget per query block of the whole packing."""
    from megatron_dsv.layers.context_parallel import _work_budgets

    seg = Segments([100, 30, 260], align=32)  # 4, 1 and 9 query blocks of 32 at 0, 128, 160; 448 tokens = 14 blocks
    budgets = torch.tensor([[2, 1, 4], [0, 1, 0]])
    assert _work_budgets(budgets, seg, DSVConfig(**CFG)) == [4, 1]  # ceil((2*4 + 1*1 + 4*9) / 14), ceil(1 / 14)


def test_zero_length_sequences_hold_no_clip(megatron_parallel):
    """cu_seqlens repeated to a fixed count (as for CUDA graphs) describe sequences of length 0: they hold
    no clip, their padded span is padding, and the layer computes what it computes without them."""
    assert Segments.from_cu_seqlens([0, 40, 80, 80, 80]) == Segments([40, 40])
    assert Segments.from_cu_seqlens([0, 40, 40, 70], [0, 64, 96, 128]) == Segments([40, 30], starts=[0, 96], total=128)
    with pytest.raises(ValueError, match="describe no tokens"):
        Segments.from_cu_seqlens([0, 0, 0])
    with pytest.raises(ValueError, match="must start with a clip"):   # padding of an empty sequence first
        Segments.from_cu_seqlens([0, 0, 40], [0, 64, 128])
    layer = core()
    q, k, v = (torch.randn(80, 1, HEADS, D) for _ in range(3))
    outs = [layer(q, k, v, None, packed_seq_params=PackedSeqParams(
        qkv_format="sbhd", cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        cu_seqlens_kv=torch.tensor(cu, dtype=torch.int32))) for cu in ([0, 40, 80], [0, 40, 80, 80, 80])]
    assert torch.equal(*outs)


def test_select_window_bad_input():
    seg = Segments([40, 50], align=32)                  # 128 tokens
    q_lr, k_lr = torch.randn(1, 64, 2, 4), torch.randn(1, 128, 2, 4)
    opts = dict(block_q=32, block_kv=16)
    with pytest.raises(ValueError, match="q_start is for packed clips"):
        select_blocks(q_lr, k_lr, 1, q_start=64, **opts)
    for q_start in (16, 96):  # not on a query block; past the packed sequence
        with pytest.raises(ValueError, match=r"q_lr holds tokens"):
            select_blocks(q_lr, k_lr, 1, segments=seg, q_start=q_start, **opts)
    with pytest.raises(ValueError, match="q_start must be an int"):
        select_blocks(q_lr, k_lr, 1, segments=seg, q_start=64.0, **opts)
    with pytest.raises(ValueError, match="segments must be a megatron_dsv.ops.Segments"):
        select_blocks(k_lr, k_lr, 1, segments=[40, 50], **opts)


def test_cp_layer_plans_once_per_length_in_a_replan_interval(megatron_parallel, monkeypatch):
    """Packed batches vary in length: the layer keeps one plan per length until the next replan
    interval (planning takes tens of milliseconds)."""
    from megatron_dsv.layers import context_parallel as lcp

    planned = []
    real = lcp.plan
    monkeypatch.setattr(lcp, "plan", lambda *a, **kw: planned.append(kw["shape"].seq_len) or real(*a, **kw))
    cp = lcp.LayerContextParallel(DSVConfig(**CFG, cp_replan_interval=10), heads=HEADS, head_dim=D,
                                  process_group=None, ranks=None)
    for step, tokens in [(0, 4096), (1, 8192), (2, 4096), (9, 8192), (10, 4096), (11, 4096)]:
        cp.plan_for([3] * HEADS, tokens, 1, step)
    assert planned == [4096, 8192, 4096]


@pytest.mark.parametrize("inference", [False, True])
def test_cu_seqlens_updated_in_place_are_read_again(inference):
    """A caller that reuses its cu_seqlens buffer, writing new offsets in place, gets the new clips. Offsets
    made under torch.inference_mode have no version counter: they are read at every call (before, the
    cache's version check raised "Inference tensors do not track version counter")."""
    from contextlib import nullcontext

    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_dsv.layers.packing import packed_segments

    with torch.inference_mode() if inference else nullcontext():
        cu = torch.tensor([0, 40, 100], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
        assert packed_segments(params, "test")[0].lengths == (40, 60)
        cu.copy_(torch.tensor([0, 70, 100], dtype=torch.int32))
        assert packed_segments(params, "test")[0].lengths == (70, 30)


def test_read_once_keeps_entries_with_an_absent_tensor():
    """An entry read with an absent tensor (cu_seqlens_padded None, the common case) stays cached while its
    tensors live: reading other tensors does not drop it (before, its None placeholder counted as a dead
    tensor, and the next miss dropped the entry)."""
    from megatron_dsv.layers.read_once import ReadOnce

    reads = []
    read = ReadOnce(lambda a, b: reads.append(a) or len(reads))
    x, y = torch.zeros(2), torch.ones(2)
    assert read(x, None) == 1
    assert read(y, None) == 2
    assert read(x, None) == 1 and len(reads) == 2
    del y   # its entry goes at the next miss; x's stays
    z = torch.full((2,), 2.0)
    assert read(z, None) == 3 and read(x, None) == 1 and len(reads) == 3
