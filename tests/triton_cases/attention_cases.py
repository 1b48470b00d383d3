"""Triton block-sparse attention against the float64 reference: forward, lse, dq, dk, dv.

Run by tests/test_triton_attention.py in a child process with TRITON_INTERPRET=1 (CPU), or
directly with pytest on a CUDA machine (then bfloat16 is covered too).
"""

import functools

import pytest
import torch

from common import DEVICE, poison, random_block_mask, rel_err  # noqa: F401  (poison is a fixture)
from megatron_dsv.ops import Segments, block_sparse_attention
from megatron_dsv.ops.reference import block_sparse_attention_reference, dense_attention_reference

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def make_qkv(b, s_q, s_kv, h, d, dtype, layout, gen, packed):
    """q, k, v in `layout`; packed=True returns non-contiguous views sliced out of one qkv buffer."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype).to(DEVICE)

    def shaped(s):
        return (b, s, h, d) if layout == "bshd" else (s, b, h, d)

    if packed:
        assert s_q == s_kv
        qkv = rnd(*shaped(s_q)[:3], 3 * d)
        return [qkv[..., i * d:(i + 1) * d] for i in range(3)]
    return rnd(*shaped(s_q)), rnd(*shaped(s_kv)), rnd(*shaped(s_kv))


def grads_of(out, lse, inputs, dout, dlse):
    """Gradients of (out * dout).sum() + (lse * dlse).sum() over the finite lse entries only (rows
    with no keys have lse -inf); dout or dlse None leaves that term out."""
    terms = []
    if dout is not None:
        terms.append((out.double() * dout.double()).sum())
    if dlse is not None:
        terms.append((torch.where(torch.isfinite(lse), lse, 0.0).double() * dlse.double()).sum())
    gs = torch.autograd.grad(sum(terms), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]


def clip_block_mask(b, h, segments, block_q, block_kv, gen):
    """Random lists for packed clips: each query block lists 0..all KV blocks of its own clip;
    query blocks of pure padding list none."""
    n_q, n_kv = -(-segments.total // block_q), -(-segments.total // block_kv)
    k_max = max(segments.blocks_per_clip(block_kv))
    kv_idx = torch.full((b, h, n_q, k_max), -1, dtype=torch.int32)
    kv_cnt = torch.zeros((b, h, n_q), dtype=torch.int32)
    for c in range(len(segments)):
        q_lo, q_hi = segments.block_range(c, block_q)
        kv_lo, kv_hi = segments.block_range(c, block_kv)
        cnt = torch.randint(0, kv_hi - kv_lo + 1, (b, h, q_hi - q_lo), generator=gen)
        idx, cnt = random_block_mask(b, h, q_hi - q_lo, kv_hi - kv_lo, counts=cnt, gen=gen, k_max=k_max)
        kv_idx[:, :, q_lo:q_hi] = torch.where(idx >= 0, idx + kv_lo, -1)
        kv_cnt[:, :, q_lo:q_hi] = cnt
    assert n_kv >= kv_idx.max()
    return kv_idx, kv_cnt


def run_case(*, b, h, s_q, s_kv, d, block_q, block_kv, dtype, layout="bshd", counts="random",
             packed=False, seed=0, loss="out", clips=None, kv_lens=None, backend="triton"):
    """loss: "out" (gradient on out only), "out+lse" (also a random gradient on the finite lse
    entries, as the CP ring merge gives) or "lse" (lse only: out unused).
    clips: lengths of clips packed into one sequence (Segments), each starting on a block boundary;
    s_q and s_kv are then ignored and padding holds zeros.
    kv_lens: "shared" ([n_kv]) or "per_head" ([b, h, n_kv]) random valid keys per KV block, 0 and
    block_kv included. backend: "triton" or "triton-one-recompute" (dq by atomics)."""
    gen = torch.Generator().manual_seed(seed)
    segments = None
    if clips is not None:
        segments = Segments(clips, align=max(block_q, block_kv))
        s_q = s_kv = segments.total
    n_q, n_kv = -(-s_q // block_q), -(-s_kv // block_kv)
    if segments is not None:
        kv_idx, kv_cnt = clip_block_mask(b, h, segments, block_q, block_kv, gen)
    elif counts == "random":  # per (batch, head, query block); includes 0 and n_kv
        cnt = torch.randint(0, n_kv + 1, (b, h, n_q), generator=gen)
        cnt.view(-1)[0] = 0
        cnt.view(-1)[-1] = n_kv
    elif counts == "all":
        cnt = torch.full((b, h, n_q), n_kv)
    elif counts == "zero":
        cnt = torch.zeros(b, h, n_q, dtype=torch.int64)
    else:  # per-head budgets, as select_blocks returns them: k_max = largest budget
        cnt = torch.tensor(counts).view(1, h, 1).expand(b, h, n_q).contiguous()
    if segments is None:
        kv_idx, kv_cnt = random_block_mask(b, h, n_q, n_kv, counts=cnt, gen=gen)
    kv_idx, kv_cnt = kv_idx.to(DEVICE), kv_cnt.to(DEVICE)
    if kv_lens is not None:
        lens = torch.randint(0, block_kv + 1, (b, h, n_kv) if kv_lens == "per_head" else (n_kv,), generator=gen)
        lens.view(-1)[:2] = torch.tensor([0, block_kv])
        kv_lens = lens.to(DEVICE)

    q, k, v = make_qkv(b, s_q, s_kv, h, d, dtype, layout, gen, packed)
    if segments is not None:  # padding holds zeros, as the layer writes it
        pad = ~segments.token_valid(DEVICE)
        pad = pad.view(1, -1, 1, 1) if layout == "bshd" else pad.view(-1, 1, 1, 1)
        q, k, v = (t.masked_fill(pad, 0.0) for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kw = dict(block_q=block_q, block_kv=block_kv, layout=layout, segments=segments)
    out, lse = block_sparse_attention(q, k, v, kv_idx, kv_cnt, backend=backend, return_lse=True,
                                      kv_lens=kv_lens, **kw)
    if kv_lens is not None:  # the reference takes the checked [1 or b*h, n_kv] form
        kw["kv_lens"] = kv_lens.reshape(-1, n_kv)
    dout = torch.randn(out.shape, generator=gen).to(dtype).to(DEVICE) if loss != "lse" else None
    dlse = torch.randn(lse.shape, generator=gen).to(DEVICE) if loss != "out" else None
    dq, dk, dv = grads_of(out, lse, (q, k, v), dout, dlse)

    # float64 oracle, and the reference's own error at the test dtype (inputs rounded the same way).
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = d ** -0.5
    out64, lse64 = block_sparse_attention_reference(q64, k64, v64, kv_idx, kv_cnt, scale=scale,
                                                    return_lse=True, **kw)
    g64 = grads_of(out64, lse64, (q64, k64, v64), dout, dlse)
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_l, lse_l = block_sparse_attention_reference(ql, kl, vl, kv_idx, kv_cnt, scale=scale, return_lse=True, **kw)
    g_l = grads_of(out_l, lse_l, (ql, kl, vl), dout, dlse)

    def check(name, x, ref, ref_lowp):
        err = rel_err(x, ref)
        if dtype == torch.float32:
            tol = 2e-5
        else:  # judged against the reference's own error at this dtype, with room for P rounding
            tol = 3 * rel_err(ref_lowp, ref) + (2e-4 if dtype == torch.float16 else 2e-3)
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol:.3g}"
        return err

    assert out.shape == q.shape and out.dtype == dtype and dq.shape == q.shape and dk.shape == k.shape
    errs = {"out": check("out", out, out64, out_l)}
    empty = torch.isinf(lse64)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty), "lse must be -inf exactly on rows with no keys"
    if (~empty).any():
        lse_err = float((lse[~empty].double() - lse64[~empty]).abs().max().detach())
        assert lse_err < (1e-4 if dtype == torch.float32 else 2e-2), f"lse abs err {lse_err:.3g}"
    if empty.all():  # count 0 everywhere: exact zeros
        assert not out.any() and not dq.any() and not dk.any() and not dv.any()
        return errs
    for name, x, ref, lowp in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, g_l):
        if name == "dv" and dout is None:  # out unused: dv is exactly zero
            assert not dv.any(), "dv must be zero when only the lse is used"
            continue
        errs[name] = check(name, x, ref, lowp)
    if dlse is not None:  # rows with no keys: zero dq (no NaN from their -inf lse)
        rows_empty = empty.transpose(1, 2) if layout == "bshd" else empty.permute(2, 0, 1)
        assert not dq[rows_empty].any(), "dq must be zero on rows with no keys"
    if segments is not None:  # padding: exactly zero output and gradients, lse -inf
        pad = ~segments.token_valid(DEVICE)
        for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
            x_pad = x[:, pad] if layout == "bshd" else x[pad]
            assert not x_pad.any(), f"{name} must be zero on padding"
        assert (lse[..., pad] == float("-inf")).all()
    return errs


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_counts_partial_tiles(dtype):
    # Sq, Skv not multiples of the blocks, Skv != Sq, counts 0..all per (b, h, query block).
    run_case(b=2, h=2, s_q=150, s_kv=200, d=32, block_q=64, block_kv=32, dtype=dtype)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_kv_blocks_packed_sbhd_views(dtype):
    # block_kv 16 packs several KV blocks per tile; q, k, v are strided slices of one sbhd buffer.
    run_case(b=1, h=2, s_q=200, s_kv=200, d=64, block_q=64, block_kv=16, dtype=dtype, layout="sbhd",
             packed=True, seed=1)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_lse_gradient(dtype):
    # loss = (out * g).sum() + (lse * g2).sum() over finite lse, as the CP ring merge differentiates it;
    # random counts include count-0 query blocks (lse -inf) and partial tiles.
    run_case(b=2, h=2, s_q=150, s_kv=200, d=32, block_q=64, block_kv=32, dtype=dtype, loss="out+lse", seed=10)


@pytest.mark.usefixtures("poison")
def test_lse_only_gradient_sbhd_packed():
    # out unused (its gradient reaches the backward as None); small packed KV tiles, sbhd views.
    run_case(b=1, h=2, s_q=96, s_kv=96, d=32, block_q=32, block_kv=16, dtype=torch.float32, layout="sbhd",
             packed=True, loss="lse", seed=11)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("block_q,block_kv,layout", [(64, 32, "bshd"), (32, 16, "sbhd"), (32, 64, "bshd")])
def test_packed_clips(dtype, block_q, block_kv, layout):
    # Clips of 70, 5 (smaller than a block), 100 and 33 tokens, each padded to a block boundary:
    # padding keys inside blocks, padding-only KV blocks (block_kv < alignment), partial query blocks.
    run_case(b=1, h=2, s_q=0, s_kv=0, d=32, block_q=block_q, block_kv=block_kv, dtype=dtype, layout=layout,
             clips=[70, 5, 100, 33], loss="out+lse", seed=20)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("block_q,block_kv,layout,kv_lens", [(64, 32, "bshd", "per_head"), (32, 16, "sbhd", "shared"),
                                                             (32, 64, "sbhd", "per_head")])
def test_kv_block_lengths(dtype, block_q, block_kv, layout, kv_lens):
    # Keys past each KV block's valid length are masked, per head or shared (the CP exchange's buffers).
    run_case(b=2, h=2, s_q=100, s_kv=150, d=32, block_q=block_q, block_kv=block_kv, dtype=dtype, layout=layout,
             kv_lens=kv_lens, loss="out+lse", seed=21)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", [
    dict(b=2, h=2, s_q=150, s_kv=200, d=32, block_q=64, block_kv=32, loss="out+lse", seed=30),  # partial tiles
    dict(b=1, h=2, s_q=200, s_kv=200, d=64, block_q=64, block_kv=16, layout="sbhd", packed=True, seed=31),  # dk^T
    dict(b=2, h=2, s_q=100, s_kv=150, d=32, block_q=32, block_kv=16, layout="sbhd", kv_lens="shared",
         loss="out+lse", seed=32),
    dict(b=1, h=2, s_q=0, s_kv=0, d=32, block_q=64, block_kv=32, clips=[70, 5, 100, 33], loss="out+lse", seed=33),
], ids=["partial_tiles_lse", "small_kv_blocks_sbhd", "kv_lens", "packed_clips"])
def test_one_recompute_backward(dtype, case):
    # dk, dv and dq from one pass over each KV block's list, dq by float32 atomics: the same checks
    # against the float64 reference as the default backward.
    run_case(dtype=dtype, backend="triton-one-recompute", **case)


@pytest.mark.parametrize("backend", ["triton", "triton-one-recompute"], ids=["deterministic", "one_recompute"])
@pytest.mark.parametrize("poison_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_padding_of_packed_clips_never_reaches_real_tokens(backend, poison_value):
    """NaN or Inf in the padding of packed clips (q, k or v, and the output gradient there) leaves the
    output and every gradient of the real tokens as with clean padding, and gives the padding
    itself zero gradients."""
    gen = torch.Generator().manual_seed(41)
    dtype = torch.float32
    packed = Segments([40, 50], align=32)   # 128 tokens; padding at 40..63 and 114..127
    pad = ~packed.token_valid(torch.device("cpu"))
    q, k, v = make_qkv(1, 128, 128, 2, 32, dtype, "bshd", gen, packed=False)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)
    kv_idx = torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3]]).view(1, 1, 4, 2).expand(1, 2, 4, 2).int().to(DEVICE)
    kv_cnt = torch.full((1, 2, 4), 2, dtype=torch.int32, device=DEVICE)
    mask = pad.view(1, -1, 1, 1).to(DEVICE)

    def run(tensors, grad):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = block_sparse_attention(*leaves, kv_idx, kv_cnt, block_q=32, block_kv=32, segments=packed,
                                     backend=backend)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, grad))

    clean = run((q, k, v), dout.masked_fill(mask, 0.0))
    for which in range(3):
        dirty = [q, k, v]
        dirty[which] = dirty[which].masked_fill(mask, poison_value)
        got = run(dirty, dout.masked_fill(mask, poison_value))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, clean):
            assert torch.isfinite(a).all() and (a.masked_select(mask) == 0).all(), (which, name)
            exact = backend == "triton"
            torch.testing.assert_close(a, b, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6,
                                       msg=lambda m: f"poisoned {'qkv'[which]}, {name}: {m}")


@pytest.mark.parametrize("pass_bytes", [None, 1 << 14], ids=["one_pass", "passes"])
def test_deterministic_backward_is_bitwise_reproducible(monkeypatch, pass_bytes):
    """The default (atomic-free) backward gives bit-identical gradients run to run, on a mask where many
    query blocks share KV blocks (the case where an atomic dq or dk/dv would reorder sums), also where
    the kernels cut the spans into L2-sized passes (forced here by a small pass size)."""
    from megatron_dsv.ops import triton_attention as ta

    if pass_bytes is not None:
        monkeypatch.setitem(ta.CONFIG_OVERRIDE, "pass_bytes", pass_bytes)
    gen = torch.Generator().manual_seed(40)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    s, h, d = (4096, 4, 64) if DEVICE == "cuda" else (256, 2, 32)
    q, k, v = (t.requires_grad_() for t in make_qkv(2, s, s, h, d, dtype, "bshd", gen, packed=False))
    n = s // 64
    kv_idx, kv_cnt = random_block_mask(2, h, n, n, counts=torch.randint(n // 4, n // 2, (2, h, n), generator=gen),
                                       gen=gen)
    kv_idx, kv_cnt = kv_idx.to(DEVICE), kv_cnt.to(DEVICE)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float32).to(dtype).to(DEVICE)

    def grads():
        out = block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q=64, block_kv=64, deterministic=True)
        return [out.detach()] + list(torch.autograd.grad(out, (q, k, v), dout))

    first = grads()
    for _ in range(3):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)


@pytest.mark.usefixtures("poison")
def test_mixed_head_budgets_block_q128():
    run_case(b=1, h=3, s_q=256, s_kv=320, d=32, block_q=128, block_kv=64, dtype=torch.float16,
             counts=[1, 5, 3], seed=2)


@pytest.mark.usefixtures("poison")
def test_all_blocks_equals_dense():
    gen = torch.Generator().manual_seed(3)
    b, h, s, d = 1, 2, 96, 32
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to(DEVICE) for _ in range(3))
    n = -(-s // 32)
    kv_idx = torch.arange(n, dtype=torch.int32).expand(b, h, n, n).contiguous().to(DEVICE)
    kv_cnt = torch.full((b, h, n), n, dtype=torch.int32).to(DEVICE)
    out = block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q=32, block_kv=32, backend="triton")
    ref = dense_attention_reference(q.double(), k.double(), v.double(), scale=d ** -0.5, layout="bshd")
    assert rel_err(out, ref) < 2e-5


@pytest.mark.usefixtures("poison")
def test_count_all_and_zero():
    run_case(b=1, h=2, s_q=100, s_kv=100, d=32, block_q=64, block_kv=32, dtype=torch.float32, counts="all",
             seed=4)
    run_case(b=1, h=2, s_q=100, s_kv=100, d=32, block_q=64, block_kv=32, dtype=torch.float16, counts="zero",
             seed=5)


@pytest.mark.parametrize("key_bits", [32, 64])
@pytest.mark.parametrize("passes", [1, 3])
def test_transposed_lists_match_kv_lists(passes, key_bits, monkeypatch):
    from megatron_dsv.ops import triton_attention
    from megatron_dsv.ops.triton_attention import transpose_block_lists

    spans, pick = [], triton_attention._sort_key_dtype

    def key_dtype(span):   # 64 bits: the width spans past int32 get (too large to build here)
        spans.append(span)
        return torch.int64 if key_bits == 64 else pick(span)
    monkeypatch.setattr(triton_attention, "_sort_key_dtype", key_dtype)

    gen = torch.Generator().manual_seed(6)
    b, h, n_q, n_kv = 2, 3, 7, 5
    cnt = torch.randint(0, n_kv + 1, (b, h, n_q), generator=gen)
    kv_idx, kv_cnt = random_block_mask(b, h, n_q, n_kv, counts=cnt, gen=gen)
    q_idx, q_bounds = transpose_block_lists(kv_idx.to(DEVICE), kv_cnt.to(DEVICE), n_kv, passes)
    q_idx, q_bounds = q_idx.cpu(), q_bounds.cpu()
    assert spans == [(b * h * n_kv + 1) * n_q]   # the sentinel group's keys counted
    assert pick(spans[0]) == torch.int32
    assert q_bounds.shape == (passes + 1, b * h * n_kv)
    for bi in range(b):
        for hi in range(h):
            for j in range(n_kv):
                g = (bi * h + hi) * n_kv + j
                for p in range(passes):   # pass p: the query blocks in [p * n_q // passes, (p + 1) * n_q // passes)
                    got = q_idx[q_bounds[p, g]:q_bounds[p + 1, g]].tolist()
                    want = [i for i in range(p * n_q // passes, (p + 1) * n_q // passes)
                            if j in kv_idx[bi, hi, i, :kv_cnt[bi, hi, i]].tolist()]
                    assert got == want, (g, p)


def test_kv_pass_lists_sort_and_split_each_list():
    """Any order of a query block's list (the op does not require ascending ids): the pass lists hold
    it ascending, and pass p's slots hold exactly its ids in pass p's KV blocks."""
    from megatron_dsv.ops.triton_attention import kv_pass_lists

    gen = torch.Generator().manual_seed(7)
    b, h, n_q, n_kv, passes = 2, 2, 5, 11, 3
    cnt = torch.randint(0, n_kv + 1, (b, h, n_q), generator=gen)
    kv_idx, kv_cnt = random_block_mask(b, h, n_q, n_kv, counts=cnt, gen=gen)
    shuffled = kv_idx.clone()
    for i in torch.nonzero(cnt).tolist():
        c = int(cnt[tuple(i)])
        shuffled[tuple(i)][:c] = kv_idx[tuple(i)][:c][torch.randperm(c, generator=gen)]
    ids, bounds = kv_pass_lists(shuffled.to(DEVICE), kv_cnt.to(DEVICE), n_kv, passes)
    ids, bounds = ids.cpu(), bounds.cpu()
    assert bounds.shape == (passes + 1, b, h, n_q) and bounds.dtype == torch.int32
    for i in torch.cartesian_prod(*(torch.arange(n) for n in (b, h, n_q))).tolist():
        i = tuple(i)
        c = int(cnt[i])
        assert ids[i][:c].tolist() == kv_idx[i][:c].tolist()
        for p in range(passes):
            lo, hi = p * n_kv // passes, (p + 1) * n_kv // passes
            assert ids[i][bounds[(p, *i)]:bounds[(p + 1, *i)]].tolist() == [x for x in kv_idx[i][:c].tolist()
                                                                            if lo <= x < hi]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("case", [
    dict(b=2, h=2, s_q=150, s_kv=200, d=32, block_q=64, block_kv=32, dtype=torch.float32, loss="out+lse", seed=50),
    dict(b=1, h=2, s_q=200, s_kv=200, d=32, block_q=32, block_kv=16, dtype=torch.float16, layout="sbhd",
         kv_lens="per_head", seed=51),
    dict(b=1, h=2, s_q=0, s_kv=0, d=32, block_q=32, block_kv=32, dtype=torch.float16, clips=[70, 5, 100, 33],
         loss="out+lse", seed=52),
    dict(b=2, h=2, s_q=150, s_kv=200, d=32, block_q=64, block_kv=32, dtype=torch.float32, loss="out+lse", seed=53,
         backend="triton-one-recompute"),
], ids=["partial_tiles_lse_fp32", "small_kv_blocks_kv_lens_fp16", "packed_clips_fp16", "one_recompute_fp32"])
def test_passes_over_the_span(monkeypatch, case):
    """Long spans run in passes that each fit in L2 (forward and dq over the KV span, dk/dv over the
    query span; a later pass resumes from what the earlier ones wrote): the same checks against the
    float64 reference as one pass. The bytes per pass are forced small, so these shapes take 3-7 passes."""
    from megatron_dsv.ops import triton_attention as ta

    monkeypatch.setitem(ta.CONFIG_OVERRIDE, "pass_bytes", 8192)
    assert ta._passes(7, 32, 32, 2, torch.device(DEVICE)) == 4
    run_case(**case)


def test_unsupported_head_dim_raises():
    q = torch.randn(1, 32, 1, 48, device=DEVICE)
    kv_idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=DEVICE)
    kv_cnt = torch.ones(1, 1, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(NotImplementedError, match="head dims"):
        block_sparse_attention(q, q, q, kv_idx, kv_cnt, block_q=32, block_kv=32, backend="triton")


@pytest.mark.parametrize("s,block", [(256, 64), (200, 32)], ids=["whole_blocks", "partial_last_block"])
def test_invalid_lists_read_in_bounds(s, block):
    """The kernels do not check list values (a host sync): counts above the lists' width read as the width,
    negative counts as 0, and ids outside [0, n_kv) (-1, n_kv, far out) read nothing out of bounds (on
    the CPU the interpreter crashed reading past the lists before the kernels clipped counts), so
    outputs and gradients stay finite (wrong, as the docstring of block_sparse_attention says). On the GPU
    the whole blocks go through TMA."""
    gen = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(1, s, 2, 64, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    n_q, n_kv = -(-s // block), -(-s // block)
    kv_idx, kv_cnt = random_block_mask(1, 2, n_q, n_kv, counts=torch.full((1, 2, n_q), 2), gen=gen)
    kv_idx, kv_cnt = kv_idx.to(DEVICE), kv_cnt.to(DEVICE)
    run = functools.partial(block_sparse_attention, q, k, v, block_q=block, block_kv=block, backend="triton")
    assert torch.equal(run(kv_idx, kv_cnt + 5), run(kv_idx, kv_cnt))
    assert torch.equal(run(kv_idx, -kv_cnt), torch.zeros_like(q))
    for bad in (-1, n_kv, 12345):   # (12345 x block: rows far past the tensor, where TMA zero-fills)
        out = run(kv_idx.masked_fill(torch.arange(2, device=DEVICE) == 1, bad), kv_cnt)
        out.sum().backward()
        assert all(bool(torch.isfinite(t).all()) for t in (out, q.grad, k.grad, v.grad)), bad
        q.grad = k.grad = v.grad = None


@pytest.mark.skipif(DEVICE != "cuda", reason="TMA descriptors exist on the GPU only")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("layout,packed", [("bshd", False), ("sbhd", True)])
def test_tma_paths(monkeypatch, layout, packed):
    from megatron_dsv.ops import triton_attention as ta

    monkeypatch.setattr(ta, "CONFIG_OVERRIDE", {"fwd": {"tma": True, "BLOCK_N": 64}, "dq": {"tma": True, "BLOCK_N": 64},
                                                "dkdv": {"tma": True}})
    s = 320 if packed else 300  # 300: a partial last KV block and query block
    run_case(b=2, h=2, s_q=s, s_kv=s, d=128, block_q=128, block_kv=64, dtype=torch.bfloat16, layout=layout,
             packed=packed, seed=9)


@pytest.mark.skipif(DEVICE != "cuda", reason="TMA descriptors exist on the GPU only")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("backend", ["triton", "triton-one-recompute"], ids=["deterministic", "one_recompute"])
def test_passes_tma_paths(monkeypatch, backend):
    """Passes through the TMA loads of whole 64-row blocks (the GPU's default path), bf16, head dim 128,
    a partial last block: 8 passes over 10 blocks, against the float64 reference."""
    from megatron_dsv.ops import triton_attention as ta

    monkeypatch.setitem(ta.CONFIG_OVERRIDE, "pass_bytes", 8192)
    assert ta._passes(10, 64, 128, 2, torch.device(DEVICE)) == ta.MAX_PASSES
    run_case(b=2, h=2, s_q=600, s_kv=620, d=128, block_q=64, block_kv=64, dtype=torch.bfloat16, loss="out+lse",
             backend=backend, seed=54)
