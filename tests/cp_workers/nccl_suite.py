"""Hybrid CP on GPUs with NCCL against a float64 reference: one torchrun process per GPU.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node <GPUs> tests/cp_workers/nccl_suite.py

Run by tests/test_cp_nccl.py, which skips on machines with fewer than two GPUs. For float32 and bfloat16, every
head-parallel size U dividing the world (U <= heads), both KV schedules and the planner's head splits:

- dsv_cp_attention (Triton kernels): the output and dq, dk, dv of this rank's shard against a float64
  reference over the same selection. Each rank's selection (return_selection: its heads, its segment,
  global KV block ids) is attended by the reference op on the whole sequence's keys. The pieces, zero
  elsewhere, are summed over the ranks into the whole reference, so heads that a plan splits
  across ranks are covered too.
- dense_cp_attention against float64 dense attention of the whole sequence, with every gradient.
- both on packed clips (float32; tests/cp_workers/worker.py's check_packed), NaN in the padding.

A failed check exits non-zero with the rank and the case; NCCL's NVLink multicast stays off.
"""

import datetime
import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_dsv.cp import HybridCPGroup, dense_cp_attention, dsv_cp_attention, fixed_plan  # noqa: E402
from megatron_dsv.ops import block_sparse_attention  # noqa: E402
from megatron_dsv.ops.reference import dense_attention_reference  # noqa: E402
from worker import check_packed, run_checks  # noqa: E402  (tests/cp_workers: this script's directory)

TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}   # relative (Frobenius) error against float64


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def reference_pieces(q, k, v, gout, kv_idx, kv_cnt, heads, seg, bq, bkv):
    """This rank's share of the float64 reference: out and dq on its segment's rows, dk and dv over the whole
    sequence, for its heads; zeros elsewhere ([S, b, H, d] each)."""
    S = q.shape[0]
    h = torch.tensor(heads, device=q.device)
    qd, kd, vd = (t.double()[:, :, h].clone().requires_grad_() for t in (q[seg], k, v))
    out = block_sparse_attention(qd, kd, vd, kv_idx, kv_cnt, block_q=bq, block_kv=bkv, layout="sbhd",
                                 backend="reference")
    (out * gout[seg][:, :, h].double()).sum().backward()
    pieces = [torch.zeros(S, *q.shape[1:], dtype=torch.float64, device=q.device) for _ in range(4)]
    pieces[0][seg, :, h], pieces[1][seg, :, h] = out.detach(), qd.grad
    pieces[2][:, :, h], pieces[3][:, :, h] = kd.grad, vd.grad
    return pieces


def check_sparse(g, dtype, *, s_local=256, b=1, H=4, d=64, r=8, bq=64, bkv=64):
    P, device = g.size, torch.device("cuda", torch.cuda.current_device())
    S = s_local * P
    gen = torch.Generator(device=device).manual_seed(7)
    q, k, v, gout = (torch.randn(S, b, H, d, generator=gen, device=device).to(dtype) for _ in range(4))
    wq, wk = (torch.randn(H, d, r, generator=gen, device=device) for _ in range(2))
    n_kv = S // bkv
    budgets = [n_kv, 1, max(1, n_kv // 3), 2][:H]
    sl = slice(g.index * s_local, (g.index + 1) * s_local)
    for U in [u for u in range(1, P + 1) if P % u == 0 and u <= H]:
        grid = g.grid(U)
        seg = slice(grid.j * S // grid.R, (grid.j + 1) * S // grid.R)
        assignments = ("lpt", "split") if U > 1 else ("naive",)
        for assignment in assignments:
            for schedule in ("gather", "ring") if grid.R > 1 else ("gather",):
                pl = fixed_plan(P, U, H, schedule=schedule, assignment=assignment, costs=[float(x) for x in budgets],
                                n_units=S // grid.R // bq)
                ql, kl, vl = (t[sl].clone().requires_grad_() for t in (q, k, v))
                out, (kv_idx, kv_cnt) = dsv_cp_attention(ql, kl, vl, wq, wk, budgets, group=g, plan=pl, block_q=bq,
                                                         block_kv=bkv, return_selection=True)
                (out * gout[sl]).sum().backward()
                pieces = reference_pieces(q, k, v, gout, kv_idx.long(), kv_cnt, pl.heads_of[grid.u], seg, bq, bkv)
                for p in pieces:
                    dist.all_reduce(p, group=g.group)
                what = f"dsv {dtype} U={U} R={grid.R} {assignment} {schedule} rank {g.index}"
                for name, got, ref in zip(("out", "dq", "dk", "dv"), (out.detach(), ql.grad, kl.grad, vl.grad), pieces):
                    err = rel_err(got, ref[sl])
                    assert err < TOL[dtype], f"{what} {name}: relative error {err:.2e}"


def check_dense(g, dtype, *, s_local=256, b=1, H=4, d=64):
    P, device = g.size, torch.device("cuda", torch.cuda.current_device())
    S = s_local * P
    gen = torch.Generator(device=device).manual_seed(11)
    q, k, v, gout = (torch.randn(S, b, H, d, generator=gen, device=device).to(dtype) for _ in range(4))
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = dense_attention_reference(qd, kd, vd, scale=d ** -0.5, layout="sbhd")
    (ref * gout.double()).sum().backward()
    sl = slice(g.index * s_local, (g.index + 1) * s_local)
    for U in [u for u in range(1, P + 1) if P % u == 0 and u <= H]:
        ql, kl, vl = (t[sl].clone().requires_grad_() for t in (q, k, v))
        out = dense_cp_attention(ql, kl, vl, group=g, U=U)
        (out * gout[sl]).sum().backward()
        for name, got, want in (("out", out.detach(), ref.detach()), ("dq", ql.grad, qd.grad),
                                ("dk", kl.grad, kd.grad), ("dv", vl.grad, vd.grad)):
            err = rel_err(got, want[sl])
            assert err < TOL[dtype], f"dense {dtype} U={U} rank {g.index} {name}: relative error {err:.2e}"


def main():
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=2))
    g = HybridCPGroup()

    def checks():
        for dtype in (torch.float32, torch.bfloat16):
            check_sparse(g, dtype)
            check_dense(g, dtype)
        # Packed clips (float32: selection must match the float64 reference's row for row), NaN in the padding.
        device = torch.device("cuda", torch.cuda.current_device())
        check_packed(g, [u for u in range(1, g.size + 1) if g.size % u == 0 and u <= 2], backend="triton",
                     dtype=torch.float32, H=2, d=32, device=device, tol=TOL[torch.float32])

    run_checks(checks)
    if g.index == 0:
        print(f"nccl suite passed on {g.size} GPUs ({torch.cuda.get_device_name()})", flush=True)


if __name__ == "__main__":
    main()
