"""Single-process pieces of the CP kernels' glue: the log-sum-exp merge of partial results."""

import pytest
import torch

from megatron_dsv.cp.kv_exchange import _merge
from megatron_dsv.ops import block_sparse_attention


def test_merge_of_partials_equals_one_call_with_finite_gradients():
    """Two KV halves attended separately and merged == one call over both, incl. rows with no keys."""
    torch.manual_seed(0)
    b, s, h, d, blk = 1, 64, 2, 8, 16
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    n_q, n_kv = s // blk, s // blk
    # Query block 0: keys in both halves; 1: only the second half; 2: only the first; 3: none.
    sel = [[0, 3], [2, 3], [1], []]
    idx = torch.full((b, h, n_q, 2), -1, dtype=torch.int32)
    cnt = torch.zeros(b, h, n_q, dtype=torch.int32)
    for i, ids in enumerate(sel):
        idx[..., i, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        cnt[..., i] = len(ids)
    full = block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_kv=blk)
    g = torch.randn_like(full)
    ref = torch.autograd.grad((full * g).sum(), (q, k, v))

    outs, lses = [], []
    for half in (0, 1):
        keep = (idx >= 2 * half) & (idx < 2 * half + 2) & (torch.arange(2) < cnt.unsqueeze(-1))
        loc = torch.where(keep, idx - 2 * half, 1 << 30).sort(-1).values
        loc = torch.where(loc == 1 << 30, -1, loc).to(torch.int32)
        kk, vv = k[:, 32 * half:32 * half + 32], v[:, 32 * half:32 * half + 32]
        o, lse = block_sparse_attention(q, kk, vv, loc, keep.sum(-1).to(torch.int32), block_q=blk, block_kv=blk,
                                        return_lse=True)
        outs.append(o)
        lses.append(lse)
    merged = _merge(outs, lses)
    assert torch.allclose(merged, full, rtol=0, atol=1e-12)
    assert torch.equal(merged[:, 48:], torch.zeros_like(merged[:, 48:])), "a query block with no keys gives zeros"
    got = torch.autograd.grad((merged * g).sum(), (q, k, v))
    for a, r in zip(got, ref):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, r, rtol=0, atol=1e-12)


def test_merge_refuses_partials_without_lse_gradient():
    o = torch.randn(1, 4, 1, 2, requires_grad=True)
    lse = torch.randn(1, 1, 4)   # as from a backend that marks lse non-differentiable
    with pytest.raises(NotImplementedError, match="lse"):
        _merge([o, o], [lse, lse])


def test_head_copies_take_any_alignment():
    """The head all-to-all's copies move 8-byte words where both sides allow it, and plain elements
    otherwise (a q/k/v view with an odd storage offset), with the same result."""
    from megatron_dsv.cp.all_to_all import _copy_heads

    base = torch.randn(6, 2, 3, 9).to(torch.bfloat16)
    for x in (base[..., 1:], base[..., :8].contiguous()):
        dst = torch.empty(6, 2, 2, 8, dtype=torch.bfloat16)
        _copy_heads(dst, range(2), x, [2, 0])
        assert torch.equal(dst, x[:, :, [2, 0]])


def test_a_failing_backward_phase_names_the_layer():
    """A collective that fails in a backward communication phase (a timeout, a lost peer) raises naming the
    group's label (its layer); forward and compute phases, out-of-memory, NotImplementedError and unlabelled
    groups pass errors on as they are."""
    from types import SimpleNamespace

    from megatron_dsv.cp.groups import HybridCPGroup

    def fail(name, label="DSVDotProductAttention (layer 3)", error=RuntimeError("gloo: timed out")):
        with HybridCPGroup.phase(SimpleNamespace(timer=None, label=label), name, torch.device("cpu")):
            raise error

    with pytest.raises(RuntimeError, match=r"^DSVDotProductAttention \(layer 3\): context-parallel a2a_bwd failed "
                                           r"\(gloo: timed out\)"):
        fail("a2a_bwd")
    for name, label, error in (("a2a", "L", RuntimeError("gloo: timed out")), ("a2a_bwd", None, RuntimeError("x")),
                               ("exchange_bwd", "L", NotImplementedError("no fp64")),
                               ("gather_bwd", "L", torch.OutOfMemoryError("out of memory")),
                               ("attention_bwd", "L", RuntimeError("CUDA error"))):
        with pytest.raises(type(error), match=f"^{error}$"):
            fail(name, label, error)
