"""The Triton kernels as torch custom ops: schema, fake implementations, autograd, torch.compile.

Run by tests/test_triton_custom_ops.py in a child process with TRITON_INTERPRET=1 (CPU), or
directly with pytest on a CUDA machine.
"""

import pytest
import torch

from common import DEVICE, random_block_mask, rel_err
from megatron_dsv.ops import block_sparse_attention, select_blocks
from megatron_dsv.ops.triton_attention import block_sparse_attn_bwd, block_sparse_attn_fwd
from megatron_dsv.ops.triton_selection import select_blocks_op


def attention_inputs(seed=0, b=1, h=2, s=96, d=32, block=32):
    gen = torch.Generator().manual_seed(seed)
    n = -(-s // block)
    cnt = torch.randint(1, n + 1, (b, h, n), generator=gen)
    kv_idx, kv_cnt = random_block_mask(b, h, n, n, counts=cnt, gen=gen)
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to(DEVICE) for _ in range(3))
    return q, k, v, kv_idx.to(DEVICE), kv_cnt.to(DEVICE)


def test_opcheck_attention_ops():
    q, k, v, kv_idx, kv_cnt = attention_inputs()
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), kv_idx, kv_cnt, 32, 32, 32 ** -0.5, "bshd")
    torch.library.opcheck(block_sparse_attn_fwd, args)
    out, lse2 = block_sparse_attn_fwd(*args)
    do = torch.randn_like(out)
    bwd_args = (do, q.detach(), k.detach(), v.detach(), out.detach(), lse2.detach(), kv_idx, kv_cnt, 32, 32,
                32 ** -0.5, "bshd")
    torch.library.opcheck(block_sparse_attn_bwd, bwd_args)
    torch.library.opcheck(block_sparse_attn_bwd, (*bwd_args, torch.randn_like(lse2)))  # with an lse gradient
    # Valid keys per KV block: shared by all heads, or per (batch, head) (the CP exchange buffers).
    for kv_len in (torch.tensor([[32, 20, 32]], dtype=torch.int32, device=DEVICE),
                   torch.randint(0, 33, (q.shape[0] * q.shape[2], 3), dtype=torch.int32, device=DEVICE)):
        torch.library.opcheck(block_sparse_attn_fwd, (*args, kv_len))
        torch.library.opcheck(block_sparse_attn_bwd, (*bwd_args, None, kv_len))
    # Packed clips also pass the valid rows of each query block.
    q_len = torch.tensor([32, 20, 7], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(block_sparse_attn_fwd, (*args, kv_len, q_len))


def test_opcheck_selection_op():
    gen = torch.Generator().manual_seed(1)
    q_lr, k_lr = (torch.randn(1, 100, 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    counts = torch.tensor([[2], [4]], device=DEVICE)
    torch.library.opcheck(select_blocks_op, (q_lr, k_lr, counts, 4, 32, 16, "max"))
    # Packed clips: key ranges per query block, valid rows per query / KV block.
    kv_range = torch.tensor([[0, 50], [0, 50], [64, 100], [64, 100]], dtype=torch.int32, device=DEVICE)
    q_valid = torch.tensor([32, 18, 32, 4], dtype=torch.int32, device=DEVICE)
    kv_valid = torch.tensor([16, 16, 16, 2, 16, 16, 4], dtype=torch.int32, device=DEVICE)
    for reduce in ("max", "mean"):
        torch.library.opcheck(select_blocks_op, (q_lr, k_lr, counts, 4, 32, 16, reduce, kv_range, q_valid, kv_valid, 4))


def test_compiled_step_matches_eager():
    q, k, v, _, _ = attention_inputs(seed=2)
    gen = torch.Generator().manual_seed(3)
    q_lr, k_lr = (torch.randn(1, 96, 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    counts = torch.tensor([[2], [1]], device=DEVICE)

    # The custom op itself: the public select_blocks checks its budgets on the host first.
    # Every budget >= 1, so every lse is finite; the loss differentiates through out and lse.
    def step(q, k, v):
        kv_idx, kv_cnt = select_blocks_op(q_lr, k_lr, counts, 2, 32, 32, "max")
        out, lse = block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q=32, block_kv=32, backend="triton",
                                          return_lse=True)
        return (out.float() ** 2).sum() + (lse * lse.detach().cos()).sum()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for eager, compiled in zip(*grads):
        assert rel_err(compiled, eager) < 1e-6
    eager_idx = select_blocks(q_lr, k_lr, torch.tensor([2, 1]), block_q=32, block_kv=32, backend="triton")[0]
    assert torch.equal(eager_idx, select_blocks_op(q_lr, k_lr, counts, 2, 32, 32, "max")[0])


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need the GPU")
def test_cuda_graph_capture_selection_forward_backward():
    q, k, v, _, _ = attention_inputs(seed=4, s=512, d=64, block=64)
    gen = torch.Generator().manual_seed(5)
    q_lr, k_lr = (torch.randn(1, 512, 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    do = torch.randn_like(q)
    counts = torch.tensor([[3], [5]], device=DEVICE)

    def step():
        kv_idx, kv_cnt = select_blocks_op(q_lr, k_lr, counts, 5, 64, 64, "max")
        out, lse2 = block_sparse_attn_fwd(q, k, v, kv_idx, kv_cnt, 64, 64, 0.125, "bshd")
        return (out, *block_sparse_attn_bwd(do, q, k, v, out, lse2, kv_idx, kv_cnt, 64, 64, 0.125, "bshd"))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles kernels, fills the budget cache
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        assert torch.equal(got, want)
