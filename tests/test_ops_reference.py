"""Reference ops against an independent float64 masked-dense oracle, forward and backward."""

import math

import pytest
import torch

from megatron_dsv.ops import block_sparse_attention, dense_attention, select_blocks
from megatron_dsv.ops.reference import dense_attention_reference


def random_block_mask(b, h, n_q, n_kv, gen, k_max=None, zero_frac=0.2):
    """Random per-(b, h, query block) KV block lists with distinct ids and random counts."""
    k_max = k_max or n_kv
    kv_idx = torch.full((b, h, n_q, k_max), -1, dtype=torch.int32)
    kv_cnt = torch.randint(0, k_max + 1, (b, h, n_q), generator=gen, dtype=torch.int32)
    kv_cnt[torch.rand(b, h, n_q, generator=gen) < zero_frac] = 0
    for idx in torch.cartesian_prod(torch.arange(b), torch.arange(h), torch.arange(n_q)):
        c = int(kv_cnt[tuple(idx)])
        ids = torch.randperm(n_kv, generator=gen)[:c]
        kv_idx[tuple(idx)][:c] = ids.to(torch.int32)  # unsorted on purpose: order must not matter
    return kv_idx, kv_cnt


def masked_dense_oracle(q, k, v, kv_idx, kv_cnt, block_q, block_kv, scale, kv_lens=None):
    """float64 dense attention with a token mask expanded from the block lists (bshd); kv_lens
    [b, h, n_kv]: only the first kv_lens keys of each KV block exist."""
    b, s_q, h, d = q.shape
    s_kv = k.shape[1]
    mask = torch.zeros(b, h, s_q, s_kv, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(kv_idx.shape[2]):
                for j in kv_idx[bi, hi, i, : kv_cnt[bi, hi, i]].tolist():
                    n = block_kv if kv_lens is None else int(kv_lens[bi, hi, j])
                    mask[bi, hi, i * block_q:(i + 1) * block_q, j * block_kv:j * block_kv + n] = True
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)), nan=0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.double())
    return out, lse


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("layout", ["bshd", "sbhd"])
def test_block_sparse_reference_matches_masked_dense(seed, layout):
    gen = torch.Generator().manual_seed(1000 + seed)
    b, h, d = 2, 3, 16
    block_q, block_kv = [(16, 16), (32, 16), (16, 32), (64, 16)][seed]
    s_q = int(torch.randint(40, 150, (1,), generator=gen))
    s_kv = s_q if seed % 2 == 0 else int(torch.randint(30, 150, (1,), generator=gen))
    n_q, n_kv = math.ceil(s_q / block_q), math.ceil(s_kv / block_kv)
    kv_idx, kv_cnt = random_block_mask(b, h, n_q, n_kv, gen)

    q = torch.randn(b, s_q, h, d, dtype=torch.float64, generator=gen)
    k = torch.randn(b, s_kv, h, d, dtype=torch.float64, generator=gen)
    v = torch.randn(b, s_kv, h, d, dtype=torch.float64, generator=gen)
    scale = 0.3
    ref_out, ref_lse = masked_dense_oracle(q, k, v, kv_idx, kv_cnt, block_q, block_kv, scale)

    def run(t):
        return t.permute(1, 0, 2, 3).detach().requires_grad_() if layout == "sbhd" else t.clone().requires_grad_()

    qi, ki, vi = run(q), run(k), run(v)
    out, lse = block_sparse_attention(qi, ki, vi, kv_idx, kv_cnt, block_q=block_q, block_kv=block_kv,
                                      scale=scale, layout=layout, backend="reference", return_lse=True)
    out_bshd = out.permute(1, 0, 2, 3) if layout == "sbhd" else out
    torch.testing.assert_close(out_bshd, ref_out, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-10, atol=1e-10)
    # Rows of query blocks with count 0 are exactly zero.
    zero_rows = (kv_cnt == 0).repeat_interleave(block_q, dim=2)[:, :, :s_q].permute(0, 2, 1)
    assert torch.all(out_bshd[zero_rows] == 0)

    grad = torch.randn_like(ref_out)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    masked_dense_oracle(qr, kr, vr, kv_idx, kv_cnt, block_q, block_kv, scale)[0].backward(grad)
    out_bshd.backward(grad)
    for mine, ref in ((qi, qr), (ki, kr), (vi, vr)):
        g = mine.grad.permute(1, 0, 2, 3) if layout == "sbhd" else mine.grad
        torch.testing.assert_close(g, ref.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shared", [False, True])
def test_block_sparse_reference_kv_lens(shared):
    # Only the first kv_lens[g] keys of KV block g exist (0 and a whole block included).
    gen = torch.Generator().manual_seed(5)
    b, h, d, s_q, s_kv, block_q, block_kv = 2, 2, 16, 70, 90, 16, 16
    n_q, n_kv = math.ceil(s_q / block_q), math.ceil(s_kv / block_kv)
    kv_idx, kv_cnt = random_block_mask(b, h, n_q, n_kv, gen)
    lens = torch.randint(0, block_kv + 1, (n_kv,) if shared else (b, h, n_kv), generator=gen)
    lens.view(-1)[:2] = torch.tensor([0, block_kv])
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64, generator=gen, requires_grad=True)
               for s in (s_q, s_kv, s_kv))
    ref_out, ref_lse = masked_dense_oracle(q, k, v, kv_idx, kv_cnt, block_q, block_kv, 0.3,
                                           lens.expand(b, h, n_kv))
    out, lse = block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q=block_q, block_kv=block_kv, scale=0.3,
                                      backend="reference", return_lse=True, kv_lens=lens)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    grad = torch.randn_like(out)
    for g, g_ref in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref_out, (q, k, v), grad)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_block_sparse_all_blocks_equals_dense():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 100, 2, 32, dtype=torch.float64, generator=gen) for _ in range(3))
    n_q, n_kv = 4, 7
    kv_idx = torch.arange(n_kv, dtype=torch.int32).expand(1, 2, n_q, n_kv).contiguous()
    kv_cnt = torch.full((1, 2, n_q), n_kv, dtype=torch.int32)
    out = block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q=32, block_kv=16, backend="reference")
    ref = dense_attention_reference(q, k, v, scale=32 ** -0.5, layout="bshd")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense_attention(q, k, v), ref, rtol=1e-12, atol=1e-12)


def test_block_sparse_low_precision_close_to_float64():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 96, 2, 32, generator=gen) for _ in range(3))
    kv_idx, kv_cnt = random_block_mask(1, 2, 3, 6, gen, zero_frac=0.0)
    ref = block_sparse_attention(q.double(), k.double(), v.double(), kv_idx, kv_cnt, block_q=32,
                                 block_kv=16, backend="reference")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        out = block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), kv_idx, kv_cnt, block_q=32,
                                     block_kv=16, backend="reference")
        assert out.dtype == dtype
        assert (out.double() - ref).norm() / ref.norm() < tol


@pytest.mark.parametrize("bad, match", [
    (dict(layout="bhsd"), "layout"),
    (dict(block_q=48), "block_q"),
    (dict(block_q=32.0), "must be ints"),
    (dict(block_kv=True), "must be ints"),
    (dict(scale="x"), "scale must be"),
    (dict(scale=-1.0), "scale must be"),
    (dict(kv_idx=torch.zeros(1, 2, 2, 2, dtype=torch.float32)), "int32 or int64"),
    (dict(kv_idx=torch.zeros(1, 2, 3, 2, dtype=torch.int32)), "kv_idx must be"),
    (dict(kv_cnt=torch.full((1, 2, 3), 2, dtype=torch.int32)), "kv_cnt must be"),
    (dict(kv_cnt=torch.full((1, 2, 2), 3, dtype=torch.int32)), "kv_cnt values"),
    (dict(kv_idx=torch.full((1, 2, 2, 2), 9, dtype=torch.int32)), "outside"),
    (dict(kv_idx=torch.zeros(1, 2, 2, 2, dtype=torch.int32)), "twice"),
    (dict(v=torch.randn(1, 64, 1, 16)), "grouped-query"),
    (dict(v=torch.randn(1, 64, 2, 32)), "value head dim"),
    (dict(backend="cuda"), "backend"),
    (dict(kv_lens=torch.full((4,), 16, device="meta")), "kv_lens must be on q's device"),
    (dict(segments=[32, 32]), "segments must be a megatron_dsv.ops.Segments"),
    (dict(return_lse="no"), "return_lse must be True or False"),
    (dict(deterministic=1), "deterministic must be True or False"),
    (dict(kv_lens=torch.full((3,), 16)), "kv_lens must be"),
    (dict(kv_lens=torch.full((4,), 1.0)), "int tensor"),
    (dict(q=torch.ones(1, 64, 2, 16, dtype=torch.int64), k=torch.ones(1, 64, 2, 16, dtype=torch.int64),
          v=torch.ones(1, 64, 2, 16, dtype=torch.int64)), "q must be float16"),
    (dict(q=torch.randn(1, 0, 2, 16), kv_idx=torch.zeros(1, 2, 0, 2, dtype=torch.int32),
          kv_cnt=torch.zeros(1, 2, 0, dtype=torch.int32)), "at least one batch element, token"),
])
def test_block_sparse_bad_input(bad, match):
    args = dict(q=torch.randn(1, 64, 2, 16), k=torch.randn(1, 64, 2, 16), v=torch.randn(1, 64, 2, 16),
                kv_idx=torch.tensor([0, 1], dtype=torch.int32).expand(1, 2, 2, 2).contiguous(),
                kv_cnt=torch.full((1, 2, 2), 2, dtype=torch.int32), block_q=32, block_kv=16,
                layout="bshd", backend="reference")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("kv_idx"),
                               args.pop("kv_cnt"), **args)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), "x"])
def test_dense_attention_needs_a_positive_scale(scale):
    q = torch.randn(1, 16, 1, 8)
    with pytest.raises(ValueError, match="scale must be"):
        dense_attention(q, q, q, scale=scale)


def test_the_interpreter_refuses_bfloat16(monkeypatch):
    """Triton's interpreter computes bfloat16 wrongly: both Triton ops refuse it there (before any kernel)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 64, 1, 32, dtype=torch.bfloat16)
    kv_idx, kv_cnt = torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="interpreter"):
        block_sparse_attention(q, q, q, kv_idx, kv_cnt, block_q=64, block_kv=64, backend="triton")
    with pytest.raises(NotImplementedError, match="interpreter"):
        select_blocks(q, q, 1, block_q=64, block_kv=64, backend="triton")


def brute_force_scores(q_lr, k_lr, block_q, block_kv):
    """Token-level proxy scores reduced per KV block, the slow obvious way."""
    b, s_q, h, r = q_lr.shape
    s_kv = k_lr.shape[1]
    n_q, n_kv = math.ceil(s_q / block_q), math.ceil(s_kv / block_kv)
    out = torch.empty(b, h, n_q, n_kv, dtype=torch.float64)
    for i in range(n_q):
        proxy = q_lr[:, i * block_q:(i + 1) * block_q].double().mean(1)  # [b, h, r]
        for j in range(n_kv):
            kb = k_lr[:, j * block_kv:(j + 1) * block_kv].double()        # [b, t, h, r]
            out[:, :, i, j] = torch.einsum("bhr,bthr->bht", proxy, kb).amax(-1)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_select_blocks_reference_invariants(seed):
    gen = torch.Generator().manual_seed(seed)
    b, h, r = 2, 4, 8
    s = int(torch.randint(50, 200, (1,), generator=gen))
    block_q, block_kv = 32, 16
    q_lr = torch.randn(b, s, h, r, generator=gen)
    k_lr = torch.randn(b, s, h, r, generator=gen)
    n_kv = math.ceil(s / block_kv)
    budgets = torch.tensor([0, 1, n_kv // 3, n_kv + 5])
    kv_idx, kv_cnt = select_blocks(q_lr, k_lr, budgets, block_q=block_q, block_kv=block_kv, backend="reference")
    assert kv_idx.dtype == torch.int32 and kv_cnt.dtype == torch.int32
    assert kv_idx.shape == (b, h, math.ceil(s / block_q), n_kv)
    assert kv_cnt[0, :, 0].tolist() == [0, 1, n_kv // 3, n_kv]
    scores = brute_force_scores(q_lr, k_lr, block_q, block_kv)
    for bi in range(b):
        for hi in range(h):
            for i in range(kv_idx.shape[2]):
                c = int(kv_cnt[bi, hi, i])
                ids = kv_idx[bi, hi, i, :c].tolist()
                assert ids == sorted(set(ids)) and all(0 <= j < n_kv for j in ids)
                assert torch.all(kv_idx[bi, hi, i, c:] == -1)
                if 0 < c < n_kv:  # every kept block scores at least as high as every dropped one
                    row = scores[bi, hi, i]
                    kept = torch.zeros(n_kv, dtype=torch.bool)
                    kept[ids] = True
                    assert row[kept].min() >= row[~kept].max() - 1e-5


def test_select_blocks_ties_go_to_lower_ids_and_int_budget():
    q_lr = torch.ones(1, 64, 2, 4)
    k_lr = torch.ones(1, 64, 2, 4)  # every block ties
    kv_idx, kv_cnt = select_blocks(q_lr, k_lr, 3, block_q=32, block_kv=16, backend="reference")
    assert kv_idx[0, :, :, :3].tolist() == [[[0, 1, 2]] * 2] * 2
    assert torch.all(kv_cnt == 3)


def test_select_blocks_mean_reduce_matches_pooled():
    gen = torch.Generator().manual_seed(5)
    q_lr = torch.randn(1, 64, 1, 4, generator=gen)
    k_lr = torch.randn(1, 64, 1, 4, generator=gen)
    kv_idx, _ = select_blocks(q_lr, k_lr, 1, block_q=32, block_kv=16, backend="reference", kv_reduce="mean")
    pooled = torch.einsum("ir,jr->ij", q_lr[0, :, 0].view(2, 32, 4).mean(1), k_lr[0, :, 0].view(4, 16, 4).mean(1))
    assert kv_idx[0, 0, :, 0].tolist() == pooled.argmax(-1).tolist()


@pytest.mark.parametrize("topk, match", [(-1, ">= 0"), (2.5, "int"), (torch.tensor([1, 2, 3]), "shape"),
                                         (torch.tensor([1.0, 2.0]), "int")])
def test_select_blocks_bad_budget(topk, match):
    with pytest.raises(ValueError, match=match):
        select_blocks(torch.randn(1, 64, 2, 4), torch.randn(1, 64, 2, 4), topk, block_q=32, block_kv=16)


@pytest.mark.parametrize("topk, k_max, match", [([1, 2], 4, "int tensor"), (torch.tensor([1.0, 2.0]), 4, "int tensor"),
                                                (torch.tensor([1, 2, 3]), 4, "int tensor"), (torch.tensor([1, 2]), 5, "k_max"),
                                                (torch.tensor([1, 2]), True, "k_max")])
def test_select_blocks_bad_device_budgets(topk, k_max, match):
    with pytest.raises(ValueError, match=match):
        select_blocks(torch.randn(1, 64, 2, 4), torch.randn(1, 64, 2, 4), topk, block_q=32, block_kv=16, k_max=k_max)


def test_select_blocks_huge_budget_is_clipped_and_bad_inputs_raise():
    q_lr, k_lr = torch.randn(1, 64, 2, 4), torch.randn(1, 64, 2, 4)
    kv_idx, kv_cnt = select_blocks(q_lr, k_lr, 2**70, block_q=32, block_kv=16)
    assert kv_cnt.eq(4).all() and kv_idx.shape[-1] == 4
    with pytest.raises(ValueError, match="floating point"):
        select_blocks(q_lr.long(), k_lr.long(), 2, block_q=32, block_kv=16)
    with pytest.raises(ValueError, match="at least one batch element"):
        select_blocks(q_lr[:, :0], k_lr, 2, block_q=32, block_kv=16)


@pytest.mark.parametrize("q, k, match", [
    (torch.randn(64, 2, 16), torch.randn(64, 2, 16), "4-D"),
    (torch.randn(1, 64, 2, 16), torch.randn(1, 64, 1, 16), "grouped-query"),
    (torch.ones(1, 64, 2, 16, dtype=torch.int32), torch.ones(1, 64, 2, 16, dtype=torch.int32), "q must be float16"),
    (torch.randn(1, 64, 2, 16), torch.randn(1, 64, 2, 8), "head dim"),
])
def test_dense_attention_checks_its_inputs(q, k, match):
    with pytest.raises(ValueError, match=match):
        dense_attention(q, k, k, layout="bshd")


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_unattended_tokens_never_reach_outputs_or_gradients(poison):
    """Keys and values of unselected blocks, of slots past the count and masked by kv_lens, and
    the padding of packed clips may hold NaN or Inf: outputs and gradients equal the clean ones."""
    from megatron_dsv.ops import Segments

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 32, generator=gen) for _ in range(3))
    idx = torch.tensor([1, 2, 3, 0]).view(1, 1, 1, 4).expand(1, 2, 4, 4).int()  # block 0 only past the count
    cnt = torch.full((1, 2, 4), 3).int()
    lens = torch.tensor([32, 32, 20, 32])  # block 2: keys 84..95 masked
    dirty_k, dirty_v = k.clone(), v.clone()
    for t in (dirty_k, dirty_v):
        t[0, :32] = poison        # block 0: never selected within a count
        t[0, 84:96] = poison      # masked by kv_lens
    packed = Segments([40, 50], align=32)  # 128 tokens; padding at 40..63 and 114..127
    clip_idx = torch.tensor([[0, 1, -1], [0, 1, -1], [2, 3, -1], [2, 3, -1]]).view(1, 1, 4, 3).expand(1, 2, 4, 3)
    pad = ~packed.token_valid(torch.device("cpu"))
    padded = [t.clone().masked_fill(pad.view(1, -1, 1, 1), poison) for t in (q, k, v)]
    cases = [
        ((q, k, v), (q, dirty_k, dirty_v), idx, cnt, dict(kv_lens=lens)),
        ((q, k, v), padded, clip_idx.int(), torch.full((1, 2, 4), 2).int(), dict(segments=packed)),
    ]
    for clean, dirty, kv_idx, kv_cnt, extra in cases:
        results = []
        for tensors in (clean, dirty):
            leaves = [t.clone().requires_grad_() for t in tensors]
            out = block_sparse_attention(*leaves, kv_idx, kv_cnt, block_q=32, block_kv=32, backend="reference",
                                         **extra)
            out.backward(torch.ones_like(out))
            results.append((out, *(t.grad for t in leaves)))
        for got, want in zip(results[1], results[0]):
            assert torch.isfinite(got).all()
        torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)  # dq


@pytest.mark.parametrize("topk", [3, [2, 5], (4, 1)])
def test_select_blocks_compiles_without_graph_breaks(topk):
    """Int and sequence budgets are checked in Python: torch.compile(fullgraph=True) traces select_blocks
    whole and gives the eager result."""
    q_lr, k_lr = torch.randn(1, 256, 2, 8), torch.randn(1, 256, 2, 8)
    compiled = torch.compile(lambda a, b: select_blocks(a, b, topk, block_q=32, block_kv=32), fullgraph=True,
                             backend="aot_eager")
    for got, want in zip(compiled(q_lr, k_lr), select_blocks(q_lr, k_lr, topk, block_q=32, block_kv=32)):
        assert torch.equal(got, want)
