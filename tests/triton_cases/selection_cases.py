"""Triton block selection against select_blocks_reference / block_scores_reference.

Run by tests/test_triton_selection.py in a child process with TRITON_INTERPRET=1 (CPU), or
directly with pytest on a CUDA machine.
"""

import pytest
import torch

from common import DEVICE
from megatron_dsv.ops import Segments, select_blocks
from megatron_dsv.ops.reference import block_scores_reference, select_blocks_reference


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Unwritten score keys would hold the largest key and be selected first, unwritten ids and counts
    an out-of-range block: the tests then fail."""
    from megatron_dsv.ops import triton_selection

    def poisoned(shape, dtype, device):
        return torch.full(shape, 2 ** 62 if dtype == torch.int64 else 2 ** 30, dtype=dtype, device=device)

    monkeypatch.setattr(triton_selection, "_empty", poisoned)


def check_structure(kv_idx, kv_cnt, budgets, b, n_q, n_kv):
    h = budgets.numel()
    k_max = max(int(budgets.max()), 1)
    assert kv_idx.shape == (b, h, n_q, k_max) and kv_idx.dtype == torch.int32
    assert kv_cnt.dtype == torch.int32
    assert torch.equal(kv_cnt.cpu(), budgets.view(1, h, 1).expand(b, h, n_q).int())
    slot = torch.arange(k_max).view(1, 1, 1, -1)
    valid = slot < kv_cnt.cpu().unsqueeze(-1)
    ids = kv_idx.cpu()
    assert (ids[~valid] == -1).all()
    assert ((ids[valid] >= 0) & (ids[valid] < n_kv)).all()
    inc = (ids[..., 1:] > ids[..., :-1]) | ~valid[..., 1:]
    assert inc.all(), "ids must be strictly ascending within the count"


def random_lr(b, s, h, r, gen, integer=False, block=None, packed=False):
    if integer:  # exact float32 arithmetic: equal-valued tokens per block, small integers -> ties
        x = torch.randint(-3, 4, (b, -(-s // block), h, r), generator=gen).float()
        x = x.repeat_interleave(block, dim=1)[:, :s]
    else:
        x = torch.randn(b, s, h, r, generator=gen)
    if packed:  # a strided view, as a fused projection would give
        x = torch.cat([x, torch.randn(b, s, h, r, generator=gen)], dim=-1)[..., :r]
    return x.to(DEVICE)


def clips_or_one_sequence(packed, block_q, length, gen, b=2, h=2, r=8):
    """(segments or None, q_lr, k_lr, budgets): five packed clips of mixed lengths (per-clip budgets, one of them
    0) or one sequence of `length` tokens."""
    segments = Segments([70, 5, 100, 33, 150], align=block_q) if packed else None
    s = segments.total if packed else length
    q_lr, k_lr = random_lr(b, s, h, r, gen), random_lr(b, s, h, r, gen)
    budgets = torch.tensor([[1, 1, 3, 2, 4], [2, 0, 5, 1, 7]]) if packed else torch.tensor([3, 9])
    return segments, q_lr, k_lr, budgets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_q,block_kv", [(64, 32), (32, 16), (64, 128)])
def test_max_reduce_is_a_valid_topk(block_q, block_kv, dtype):
    # bf16 keys take the bf16x3 products on the GPU; the interpreter's bf16 arithmetic is wrong.
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("bf16 selection runs on the GPU only (the interpreter's bf16 is wrong)")
    gen = torch.Generator().manual_seed(block_q + block_kv)
    b, h, s_q, s_kv, r = 2, 3, 300, 420, 16
    q_lr = random_lr(b, s_q, h, r, gen, packed=True).to(dtype)
    k_lr = random_lr(b, s_kv, h, r, gen).to(dtype)
    n_q, n_kv = -(-s_q // block_q), -(-s_kv // block_kv)
    topk = torch.tensor([0, n_kv, max(1, n_kv // 3)])
    kv_idx, kv_cnt = select_blocks(q_lr, k_lr, topk, block_q=block_q, block_kv=block_kv, backend="triton")
    budgets = topk.clamp(max=n_kv)
    check_structure(kv_idx, kv_cnt, budgets, b, n_q, n_kv)
    # Float summation order differs from the reference, so near-ties may flip: the chosen set must be
    # a top-k of the reference scores up to rounding, and almost every row must match exactly.
    ref = block_scores_reference(q_lr, k_lr, block_q=block_q, block_kv=block_kv).cpu()
    chosen = (kv_idx.cpu().long().unsqueeze(-1) == torch.arange(n_kv)).any(-2)
    lo = torch.where(chosen, ref, float("inf")).amin(-1)
    hi = torch.where(chosen, float("-inf"), ref).amax(-1)
    both = torch.isfinite(lo) & torch.isfinite(hi)
    assert (lo[both] >= hi[both] - 1e-5 * ref.abs().max()).all()
    ref_idx, _ = select_blocks_reference(q_lr, k_lr, budgets, max(int(budgets.max()), 1), block_q=block_q,
                                         block_kv=block_kv)
    same = (ref_idx.cpu() == kv_idx.cpu()).all(-1).float().mean()
    assert same > 0.95, f"only {same:.3f} of the rows match the reference exactly"


def test_bf16_scores_are_float32_accurate():
    """bf16 keys take the bf16x3 products (a float32 proxy split into three bf16 parts): each block
    score within 5e-7 (relative to the largest) of the float64 score of the same proxy. In a torch
    emulation float32 accumulation errs 6e-8 there, and dropping the split's smallest part 2.5e-6."""
    if DEVICE == "cpu":
        pytest.skip("bf16 selection runs on the GPU only (the interpreter's bf16 is wrong)")
    from megatron_dsv.ops import triton_selection as ts

    gen = torch.Generator().manual_seed(3)
    b, h, s, r, block_q, block_kv = 1, 2, 4096, 16, 64, 64
    q_lr, k_lr = (random_lr(b, s, h, r, gen).to(torch.bfloat16) for _ in range(2))
    proxy = ts._block_means(q_lr, block_q)                                 # float32 [b, h, n_q, r]
    order = (ts._score_keys_max(proxy, k_lr, block_kv, None, 0) >> 32).to(torch.int32)
    got = torch.where(order >= 0, order, order ^ 0x7FFFFFFF).view(torch.float32)  # the keys' scores
    tokens = torch.einsum("bhir,bshr->bhis", proxy.double(), k_lr.double())
    want = tokens.view(*tokens.shape[:3], -1, block_kv).amax(-1)
    assert ((got.double() - want).abs() <= 5e-7 * want.abs().max()).all()


@pytest.mark.parametrize("kv_reduce", ["max", "mean"])
def test_ties_match_reference_exactly(kv_reduce):
    gen = torch.Generator().manual_seed(7)
    b, h, s_q, s_kv, r, block_q, block_kv = 1, 2, 192, 200, 8, 64, 16
    q_lr = random_lr(b, s_q, h, r, gen, integer=True, block=block_q)
    k_lr = random_lr(b, s_kv, h, r, gen, integer=True, block=4)
    budgets = torch.tensor([3, 7])
    kv_idx, kv_cnt = select_blocks(q_lr, k_lr, budgets, block_q=block_q, block_kv=block_kv, backend="triton",
                                   kv_reduce=kv_reduce)
    ref_idx, ref_cnt = select_blocks_reference(q_lr, k_lr, budgets, 7, block_q=block_q, block_kv=block_kv,
                                               kv_reduce=kv_reduce)
    assert torch.equal(kv_idx.cpu(), ref_idx.cpu()) and torch.equal(kv_cnt.cpu(), ref_cnt.cpu())


def test_zero_budget_everywhere():
    gen = torch.Generator().manual_seed(8)
    q_lr, k_lr = random_lr(1, 64, 2, 16, gen), random_lr(1, 64, 2, 16, gen)
    kv_idx, kv_cnt = select_blocks(q_lr, k_lr, 0, block_q=32, block_kv=16, backend="triton")
    assert kv_idx.shape == (1, 2, 2, 1) and (kv_idx == -1).all() and (kv_cnt == 0).all()


@pytest.mark.parametrize("kv_reduce", ["max", "mean"])
@pytest.mark.parametrize("block_q,block_kv", [(64, 16), (32, 64)])
def test_packed_clips_match_each_clip_alone(kv_reduce, block_q, block_kv):
    # Clips of 70, 5 (smaller than a block), 100, 33 and 150 tokens, each on a block boundary, with
    # per-(head, clip) budgets including 0 and more than the clip has. Integer-valued inputs (constant
    # per query block) make the arithmetic exact, so the match with the reference, which selects each
    # clip on its own, is exact. Padding holds garbage that must be ignored.
    gen = torch.Generator().manual_seed(block_q + block_kv)
    segments = Segments([70, 5, 100, 33, 150], align=max(block_q, block_kv))
    b, h, r = 2, 2, 8
    q_lr = random_lr(b, segments.total, h, r, gen, integer=True, block=block_q)
    k_lr = random_lr(b, segments.total, h, r, gen, integer=True, block=4)
    pad = ~segments.token_valid(DEVICE).view(1, -1, 1, 1)
    q_lr = torch.where(pad, 100.0 * torch.randn(q_lr.shape, generator=gen).to(DEVICE), q_lr)
    k_lr = torch.where(pad, 100.0 * torch.randn(k_lr.shape, generator=gen).to(DEVICE), k_lr)
    budgets = torch.tensor([[0, 1, 2, 9, 3], [4, 0, 99, 1, 5]])
    kv_idx, kv_cnt = select_blocks(q_lr, k_lr, budgets, block_q=block_q, block_kv=block_kv, backend="triton",
                                   kv_reduce=kv_reduce, segments=segments)
    clipped = torch.minimum(budgets, torch.tensor(segments.blocks_per_clip(block_kv)))
    ref_idx, ref_cnt = select_blocks_reference(q_lr, k_lr, clipped, int(clipped.max()), block_q=block_q,
                                               block_kv=block_kv, kv_reduce=kv_reduce, segments=segments)
    assert torch.equal(kv_cnt.cpu(), ref_cnt.cpu())
    assert torch.equal(kv_idx.cpu(), ref_idx.cpu())
    for c in range(len(segments)):  # the reference's own contract: ids within the clip
        q_lo, q_hi = segments.block_range(c, block_q)
        kv_lo, kv_hi = segments.block_range(c, block_kv)
        ids = ref_idx[:, :, q_lo:q_hi].cpu()
        assert ((ids == -1) | ((ids >= kv_lo) & (ids < kv_hi))).all()
    padding_blocks = segments.block_clip(block_q) < 0
    assert not kv_cnt.cpu()[:, :, padding_blocks].any()


@pytest.mark.parametrize("kv_reduce", ["max", "mean"])
def test_packed_query_window_is_a_slice_of_the_whole(kv_reduce):
    # A context-parallel rank selects for its window [q_start, q_start + Sq) of the packed sequence
    # against all keys: its rows equal those of the whole sequence's selection (and the reference's).
    gen = torch.Generator().manual_seed(5)
    block_q, block_kv = 32, 16
    segments = Segments([70, 5, 100, 33, 150], align=block_q)
    b, h, r = 1, 2, 8
    q_lr = random_lr(b, segments.total, h, r, gen, integer=True, block=block_q)
    k_lr = random_lr(b, segments.total, h, r, gen, integer=True, block=4)
    budgets = torch.tensor([[1, 1, 2, 9, 3], [4, 0, 99, 1, 5]])
    opts = dict(block_q=block_q, block_kv=block_kv, kv_reduce=kv_reduce, segments=segments)
    whole = select_blocks(q_lr, k_lr, budgets, backend="triton", **opts)
    for q_start, n in ((0, 96), (96, 192), (288, segments.total - 288)):
        window = slice(q_start // block_q, (q_start + n) // block_q)
        for backend in ("triton", "reference"):
            kv_idx, kv_cnt = select_blocks(q_lr[:, q_start:q_start + n], k_lr, budgets, backend=backend,
                                           q_start=q_start, **opts)
            assert torch.equal(kv_cnt.cpu(), whole[1][:, :, window].cpu())
            k = int(kv_cnt.max()) if kv_cnt.numel() else 0
            assert torch.equal(kv_idx[..., :k].cpu(), whole[0][:, :, window, :k].cpu())


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("width, k_max", [(7, 3), (40, 17), (16, 16), (100, 1)])
def test_top_blocks_kernel_equals_topk_and_sort(monkeypatch, width, k_max, ties):
    """The threshold-search top-k (_top_blocks_kernel) against torch.topk + sort on the same keys:
    per-head counts, per-(head, query block) counts with rows of count 0 (packed padding), -inf
    entries, scores of either sign and equal scores (ties go to the lower block id)."""
    from megatron_dsv.ops import triton_selection as ts

    gen = torch.Generator().manual_seed(width)
    b, h, n_q = 2, 3, 5
    scores = torch.randint(-2, 3, (b, h, n_q, width), generator=gen).float() if ties else \
        torch.randn(b, h, n_q, width, generator=gen)
    keys = ts._order_keys(scores).to(DEVICE)
    keys[..., -1] = ts._NEG_INF_KEY
    per_head = torch.randint(1, k_max + 1, (h, 1), generator=gen)
    per_head[0] = k_max
    per_block = torch.randint(0, k_max + 1, (h, n_q), generator=gen)
    per_block[0, 0] = 0
    for counts in (per_head, per_block.clamp(max=width - 1)):
        counts = counts.to(DEVICE)
        got = ts._top_blocks(keys, counts, k_max, width)
        monkeypatch.setattr(ts, "TOP_BLOCKS_MAX_WIDTH", 0)
        want = ts._top_blocks(keys, counts, k_max, width)
        monkeypatch.setattr(ts, "TOP_BLOCKS_MAX_WIDTH", 16384)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_budgets_kept_on_the_device_select_as_host_budgets(backend):
    """Budgets as a device tensor with a wider k_max (what a layer's training steps pass) pick the blocks
    host budgets pick, with -1 in the extra columns; changed in place, the next call reads them."""
    gen = torch.Generator().manual_seed(11)
    b, h, s, r = 2, 3, 320, 8
    q_lr, k_lr = random_lr(b, s, h, r, gen), random_lr(b, s, h, r, gen)
    held = torch.tensor([1, 4, 2], device=DEVICE)
    for budgets in ([1, 4, 2], [3, 0, 5]):
        held.copy_(torch.tensor(budgets))
        want_idx, want_cnt = select_blocks(q_lr, k_lr, budgets, block_q=32, block_kv=32, backend=backend)
        got_idx, got_cnt = select_blocks(q_lr, k_lr, held, block_q=32, block_kv=32, backend=backend, k_max=8)
        k = want_idx.shape[-1]
        assert got_idx.shape[-1] == 8 and torch.equal(got_cnt, want_cnt)
        assert torch.equal(got_idx[..., :k], want_idx) and (got_idx[..., k:] == -1).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("wide", [False, True], ids=["kernel", "topk_fallback"])
def test_budgets_on_the_device_are_clipped_to_k_max(monkeypatch, backend, wide):
    """Device budgets are not read by the host, so not checked: outside [0, k_max] they select as the
    nearest end of it, and kv_cnt never exceeds kv_idx's width (the kernels would read past a list)."""
    from megatron_dsv.ops import triton_selection

    if wide:   # rows past the kernel's width go through torch.topk
        monkeypatch.setattr(triton_selection, "TOP_BLOCKS_MAX_WIDTH", 4)
    gen = torch.Generator().manual_seed(12)
    q_lr, k_lr = random_lr(1, 320, 3, 8, gen), random_lr(1, 320, 3, 8, gen)
    held = torch.tensor([-2, 9, 3], device=DEVICE)
    got_idx, got_cnt = select_blocks(q_lr, k_lr, held, block_q=32, block_kv=32, backend=backend, k_max=3)
    want_idx, want_cnt = select_blocks(q_lr, k_lr, [0, 3, 3], block_q=32, block_kv=32, backend=backend)
    assert torch.equal(got_cnt, want_cnt) and torch.equal(got_idx, want_idx)


@pytest.mark.parametrize("packed", [False, True], ids=["one_sequence", "packed_clips"])
@pytest.mark.parametrize("spans", [2, 3])
def test_key_spans_select_as_one_span(monkeypatch, packed, spans):
    # Short sequences cut the keys into spans scored by separate programs (_score_spans); every span
    # writes its own entries, so the result equals one span's exactly (same tiles, same arithmetic).
    from megatron_dsv.ops import triton_selection as ts

    block_q, block_kv = 32, 16
    segments, q_lr, k_lr, budgets = clips_or_one_sequence(packed, block_q, 420, torch.Generator().manual_seed(11 + spans))
    kw = dict(block_q=block_q, block_kv=block_kv, backend="triton", segments=segments)
    monkeypatch.setitem(ts.CONFIG_OVERRIDE, "score_block_n", 64)   # several steps per span
    monkeypatch.setitem(ts.CONFIG_OVERRIDE, "score_spans", 1)
    one = select_blocks(q_lr, k_lr, budgets, **kw)
    monkeypatch.setitem(ts.CONFIG_OVERRIDE, "score_spans", spans)
    cut = select_blocks(q_lr, k_lr, budgets, **kw)
    assert torch.equal(one[0], cut[0]) and torch.equal(one[1], cut[1])


@pytest.mark.parametrize("counted", [False, True], ids=["whole_blocks", "valid_counts"])
@pytest.mark.parametrize("h,r,cols", [(3, 24, None), (5, 120, 512)], ids=["default_columns", "row_chunks"])
def test_block_means_match_the_reference_formula(monkeypatch, counted, h, r, cols):
    # The proxies (and mean(k_lr)) in one kernel: the reference's sum over each block / its tokens, the
    # last block cut at S; a strided input, as a slice of a fused projection gives. Rank 24 puts parts of
    # two heads in one program's 32 columns; 512 columns per program sum a block 16 rows at a time.
    from megatron_dsv.ops import triton_selection as ts
    from megatron_dsv.ops.reference import block_means_reference

    if cols is not None:
        monkeypatch.setitem(ts.CONFIG_OVERRIDE, "means_cols", cols)
    gen = torch.Generator().manual_seed(5 + counted)
    b, s, block = 2, 300, 64
    x = random_lr(b, s, h, r, gen, packed=True)
    n = -(-s // block)
    count = torch.randint(1, block + 1, (n,), generator=gen).float() if counted else None
    got = ts._block_means(x, block, count.to(DEVICE) if counted else None).cpu()
    want = block_means_reference(x.cpu().permute(0, 2, 1, 3), block, count)
    assert got.shape == (b, h, n, r)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kv_reduce", ["max", "mean"])
@pytest.mark.parametrize("packed", [False, True], ids=["one_sequence", "packed"])
def test_parts_select_as_the_whole(monkeypatch, kv_reduce, packed):
    # Long sequences score and pick their query blocks in parts (SCORE_KEYS_BYTES): each row's keys and
    # top-k are its own, so the parts' result equals the whole's exactly, with per-row counts (packed clips)
    # and clip ranges cut along with the rows; a last part shorter than the others.
    from megatron_dsv.ops import triton_selection as ts

    block_q, block_kv = 16, 16
    segments, q_lr, k_lr, budgets = clips_or_one_sequence(packed, block_q, 300, torch.Generator().manual_seed(23 + packed))
    kw = dict(block_q=block_q, block_kv=block_kv, backend="triton", kv_reduce=kv_reduce, segments=segments)
    whole = select_blocks(q_lr, k_lr, budgets, **kw)
    monkeypatch.setitem(ts.CONFIG_OVERRIDE, "score_part_rows", 6)
    parts = select_blocks(q_lr, k_lr, budgets, **kw)
    assert -(-q_lr.shape[1] // block_q) % 6   # the last part is shorter
    assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1])


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kv_reduce", ["max", "mean"])
def test_non_finite_projections_still_give_valid_lists(backend, kv_reduce):
    # A diverging run hands the selection NaN and inf. Its lists must stay lists the attention kernels can
    # read (ids in range, ascending, exactly the budget per row): the NaN then reaches the loss, where the
    # training loop's checks see it, instead of an out-of-range gather faulting on the device.
    gen = torch.Generator().manual_seed(41)
    b, h, s, r, block = 2, 2, 200, 8, 32
    q_lr, k_lr = random_lr(b, s, h, r, gen), random_lr(b, s, h, r, gen)
    q_lr[0, :40] = float("nan")                    # whole query blocks of NaN
    q_lr[1, 70, 1] = float("nan")                  # one NaN token in a block
    k_lr[0, 100:140] = float("inf")
    k_lr[1, :, :, 3] = -float("inf")               # inf - inf: NaN scores everywhere in batch element 1
    budgets = torch.tensor([2, 5])
    n = -(-s // block)
    kv_idx, kv_cnt = select_blocks(q_lr, k_lr, budgets, block_q=block, block_kv=block, backend=backend,
                                   kv_reduce=kv_reduce)
    check_structure(kv_idx, kv_cnt, budgets, b, n, n)


def test_parts_follow_the_keys_budget(monkeypatch):
    from megatron_dsv.ops import triton_selection as ts

    monkeypatch.setattr(ts, "SCORE_KEYS_BYTES", 8 * 4 * 1024 * 200)   # 200 rows of 4 x 1024 keys
    assert ts._rows_per_part(4 * 1024, 150) == 150          # they fit: one part
    assert ts._rows_per_part(4 * 1024, 1000) == 192         # whole tiles of 64 rows
    assert ts._rows_per_part(4 * 1024 * 100, 1000) == 64    # at least one tile
    assert ts._rows_per_part(4 * 1024, 1000, key_bytes=28) == 64   # "mean"'s temporaries


@pytest.mark.parametrize("kv_reduce", ["max", "mean"])
def test_the_op_splits_where_its_keys_outgrow_the_budget(monkeypatch, kv_reduce):
    # The op's own estimate (batch x heads x KV blocks per row, the reduction's bytes per entry) decides the
    # parts: a budget of 64 rows' keys gives two parts (64 + 6 query blocks), with the whole's result.
    from megatron_dsv.ops import triton_selection as ts

    gen = torch.Generator().manual_seed(31)
    b, h, r, block = 2, 2, 8, 16
    s = 70 * block
    q_lr, k_lr = random_lr(b, s, h, r, gen), random_lr(b, s, h, r, gen)
    kw = dict(block_q=block, block_kv=block, backend="triton", kv_reduce=kv_reduce)
    whole = select_blocks(q_lr, k_lr, torch.tensor([3, 9]), **kw)
    calls = []
    top_blocks = ts._top_blocks
    monkeypatch.setattr(ts, "_top_blocks", lambda keys, *a: calls.append(keys.shape[2]) or top_blocks(keys, *a))
    monkeypatch.setattr(ts, "SCORE_KEYS_BYTES", ts.KEY_BYTES[kv_reduce] * b * h * 70 * 64)
    parts = select_blocks(q_lr, k_lr, torch.tensor([3, 9]), **kw)
    assert calls == [64, 6]
    assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1])
