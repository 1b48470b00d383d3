"""The pooled remainder of unselected blocks (ops/coarse.py) against exact attention."""

import pytest
import torch

from megatron_dsv.ops import block_sparse_attention, dense_attention
from megatron_dsv.ops.coarse import coarse_remainder


def sparse_with_remainder(q, k, v, kv_idx, kv_cnt, block=32):
    out, lse = block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q=block, block_kv=block, layout="bshd",
                                      backend="reference", return_lse=True)
    return coarse_remainder(q, k, v, kv_idx, kv_cnt, out, lse, block_q=block, block_kv=block,
                            scale=q.shape[-1] ** -0.5, layout="bshd")


def blockwise_constant(x, block):
    """x with every block's tokens replaced by their mean (the last block may be partial)."""
    b, s, h, d = x.shape
    out = x.clone()
    for start in range(0, s, block):
        out[:, start:start + block] = x[:, start:start + block].mean(1, keepdim=True)
    return out


@pytest.mark.parametrize("s_kv", [128, 112])
def test_exact_when_blocks_hold_equal_keys_and_values(s_kv):
    """Pooling is exact for blocks of equal keys and values: selected + pooled = dense attention,
    forward and gradients, whatever the selection (none, some, all, partial last block)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 96, 2, 16, generator=gen, dtype=torch.float64)
    k, v = (blockwise_constant(torch.randn(1, s_kv, 2, 16, generator=gen, dtype=torch.float64), 32) for _ in range(2))
    kv_idx = torch.tensor([[0, 2, -1, -1], [1, -1, -1, -1], [0, 1, 2, 3]]).view(1, 1, 3, 4).expand(1, 2, 3, 4).int()
    kv_cnt = torch.tensor([2, 1, 4]).view(1, 1, 3).expand(1, 2, 3).int()
    kv_cnt = kv_cnt.clone()
    kv_cnt[0, 1, 0] = 0  # one query block of one head selects nothing: all of it comes pooled
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = sparse_with_remainder(*leaves, kv_idx, kv_cnt)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*ref_leaves, layout="bshd")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    got.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(leaves[0].grad, ref_leaves[0].grad, rtol=1e-9, atol=1e-9)  # dq
    # dk and dv differ within a block (pooling spreads a block's gradient evenly); their block sums agree.
    for a, r in zip(leaves[1:], ref_leaves[1:]):
        torch.testing.assert_close(blockwise_constant(a.grad, 32), blockwise_constant(r.grad, 32), rtol=1e-9, atol=1e-9)


def test_all_blocks_selected_adds_nothing_and_others_move_toward_dense():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 128, 2, 16, generator=gen) for _ in range(3))
    every = torch.arange(4).view(1, 1, 1, 4).expand(1, 2, 4, 4).int()
    four = torch.full((1, 2, 4), 4).int()
    full = block_sparse_attention(q, k, v, every, four, block_q=32, block_kv=32, layout="bshd", backend="reference")
    torch.testing.assert_close(sparse_with_remainder(q, k, v, every, four), full, rtol=1e-6, atol=1e-6)
    one = torch.ones(1, 2, 4).int()
    sparse = block_sparse_attention(q, k, v, every, one, block_q=32, block_kv=32, layout="bshd", backend="reference")
    dense = dense_attention(q, k, v, layout="bshd")
    assert (sparse_with_remainder(q, k, v, every, one) - dense).norm() < (sparse - dense).norm()


def test_layer_option_adds_the_remainder_in_stage2(megatron_parallel):
    """DSVConfig.coarse_remainder: the stage-2 layer's output moves toward dense attention; packed
    clips raise instead of silently skipping it."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from test_layer import SMALL, core

    from megatron_dsv import DSVConfig

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(256, 1, 2, 32, generator=gen) for _ in range(3))
    cfg = DSVConfig(**SMALL, stage1_min_steps=0, stage1_max_steps=1, budget_floor=0.0, layer_sparsity_threshold=0.0)
    outs = {}
    for coarse in (False, True):
        layer = core(cfg.replace(coarse_remainder=coarse))
        state = layer.controller.state_dict()
        state["stage"].fill_(2)
        state["block_sparsity"].fill_(0.75)  # 2 of 8 blocks per query block
        layer.controller.load_state_dict(state)
        outs[coarse] = layer(q, k, v, None)
        assert layer.last_used_sparse
    dense = dense_attention(q, k, v, layout="sbhd").reshape(256, 1, -1)
    assert (outs[True] - dense).norm() < 0.9 * (outs[False] - dense).norm()
    cu = torch.tensor([0, 128, 256], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="coarse_remainder does not support packed"):
        layer(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu))
