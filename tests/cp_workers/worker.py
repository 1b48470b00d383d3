"""One rank of a multi-process CP test (gloo, CPU). Run by tests/test_cp_dist.py:

    python worker.py SUITE WORLD RANK INIT_FILE

Each suite runs many checks in one process group; any failed assert exits non-zero with a traceback.
"""

import os
import sys
import traceback
from collections import defaultdict
from datetime import timedelta

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_dsv.cp import (HybridCPGroup, assign_split, dense_cp_attention, dsv_cp_attention, fixed_plan,  # noqa: E402
                             gather_segments, head_to_seq, seq_to_head, sparse_kv_attention, plan, Shape,
                             check_plan_identical, allreduce_head_stats)
from megatron_dsv.ops import Segments, block_sparse_attention, dense_attention, select_blocks  # noqa: E402
from megatron_dsv.ops.reference import dense_attention_reference  # noqa: E402

F64 = torch.float64
TOL = 1e-10


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    if b.norm() == 0:
        assert a.norm() == 0, f"{what}: expected zeros"
        return
    e = rel_err(a, b)
    assert e <= TOL, f"{what}: relative error {e:.3e} > {TOL}"


def sums(log):
    out = defaultdict(lambda: [0, 0])
    for r in log:
        out[r.name][0] += r.sent
        out[r.name][1] += r.received
    return dict(out)


def uneven_heads(H, U, shift):
    """A deliberately uneven, permuted head assignment: rank u gets heads in a rotated order."""
    order = [(h * 5 + shift) % H for h in range(H)] if H % 5 else [(h + shift) % H for h in range(H)]
    sizes = [1] * U
    for i in range(H - U):
        sizes[(i * 7) % U] += 1
    out, off = [], 0
    for n in sizes:
        out.append(tuple(order[off:off + n]))
        off += n
    return tuple(out)


# ------------------------------------------------------------------------------------------ layout
def check_layout(g: HybridCPGroup, H=7, b=2, s=3, D=5):
    P, c = g.size, g.index

    def code(pos, head, ch, bb):   # every value tells where it came from: exact integers in float64
        return ((pos * 100 + head) * 10 + ch) * 10 + bb

    pos = torch.arange(c * s, (c + 1) * s).view(s, 1, 1, 1)
    hh = torch.arange(H).view(1, 1, H, 1)
    ch = torch.arange(D).view(1, 1, 1, D)
    bb = torch.arange(b).view(1, b, 1, 1)
    x = code(pos, hh, ch, bb).to(F64)
    for U in [u for u in range(1, P + 1) if P % u == 0 and u <= H]:
        grid = g.grid(U)
        for shift in (0, 3):
            heads_of = uneven_heads(H, U, shift)
            g.log.clear()
            y = seq_to_head(x, g, U, heads_of)
            mine = torch.tensor(heads_of[grid.u]).view(1, 1, -1, 1)
            seg_pos = torch.arange(grid.j * U * s, (grid.j + 1) * U * s).view(-1, 1, 1, 1)
            expect = code(seg_pos, mine, ch, bb).to(F64)
            assert torch.equal(y, expect), f"seq_to_head U={U} {heads_of}: wrong values"
            sent, recv = sums(g.log).get("head_a2a", (0, 0))   # U = 1: nothing moves, no collective
            n_me = len(heads_of[grid.u])
            assert sent == 8 * s * b * D * (H - n_me), (sent, "closed form of head a2a send bytes")
            assert recv == 8 * s * b * D * n_me * (U - 1), (recv, "closed form of head a2a recv bytes")
            back = head_to_seq(y, g, U, heads_of)
            assert torch.equal(back, x), f"head_to_seq(seq_to_head(x)) != x for U={U}"
            # Autograd: the gradient of sum(y * w) w.r.t. x is w moved back exactly.
            xr = x.clone().requires_grad_()
            w = expect * 3 + 1
            (seq_to_head(xr, g, U, heads_of) * w).sum().backward()
            assert torch.equal(xr.grad, x * 3 + 1), f"seq_to_head backward U={U}"
            yr = y.clone().requires_grad_()
            (head_to_seq(yr, g, U, heads_of) * (x * 2)).sum().backward()
            assert torch.equal(yr.grad, expect * 2), f"head_to_seq backward U={U}"
            # Split heads (held by several ranks): each holder receives the head; the adjoint sums.
            costs = [float(h % 3 == 0) * 5 + 1 for h in range(H)]
            split_of, _ = assign_split(costs, U, 3)
            mult = torch.zeros(H, dtype=F64)
            for hs in split_of:
                mult[list(hs)] += 1
            ys = seq_to_head(x, g, U, split_of)
            mine_s = torch.tensor(split_of[grid.u]).view(1, 1, -1, 1)
            assert torch.equal(ys, code(seg_pos, mine_s, ch, bb).to(F64)), f"seq_to_head split U={U}"
            assert torch.equal(head_to_seq(ys, g, U, split_of, H), x * mult.view(1, 1, H, 1)), "split adjoint"
            xr = x.clone().requires_grad_()
            seq_to_head(xr, g, U, split_of).sum().backward()
            assert torch.equal(xr.grad, mult.view(1, 1, H, 1).expand_as(x)), "split seq_to_head backward"
            # Gather of the R group: the whole sequence of my heads, in order; backward sums back.
            full = gather_segments(y, g, U)
            allpos = torch.arange(0, P * s).view(-1, 1, 1, 1)
            assert torch.equal(full, code(allpos, mine, ch, bb).to(F64)), f"gather_segments U={U}"
            yr = y.clone().requires_grad_()
            (gather_segments(yr, g, U) * 2).sum().backward()
            assert torch.equal(yr.grad, torch.full_like(y, 2.0 * grid.R)), f"gather_segments backward U={U}"


# ------------------------------------------------------------------------------------------ sparse
def make_problem(seed, S, b, H, d):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(S, b, H, d, generator=gen, dtype=F64) for _ in range(3))
    gout = torch.randn(S, b, H, d, generator=gen, dtype=F64)
    return q, k, v, gout


def reference(q, k, v, gout, kv_idx, kv_cnt, bq, bkv):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q=bq, block_kv=bkv, layout="sbhd",
                                 backend="reference")
    (out * gout).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def closed_form_bytes(kv_idx, kv_cnt, grid, heads_of, seg, bkv, d, elem):
    """Per-rank (sent, received) of block data, from the global selection, with Python sets."""
    n_seg = seg // bkv

    def need(u, j):
        hs = heads_of[u]
        nq = kv_idx.shape[2] // grid.R
        s = set()
        for bb in range(kv_idx.shape[0]):
            for hi, h in enumerate(hs):
                for i in range(j * nq, (j + 1) * nq):
                    for t in range(int(kv_cnt[bb, h, i])):
                        gid = int(kv_idx[bb, h, i, t])
                        if gid // n_seg != j:
                            s.add((bb, hi, gid))
        return s

    u, j = grid.u, grid.j
    mine = need(u, j)
    received = len(mine)
    sent = sum(1 for j2 in range(grid.R) if j2 != j for (_, _, gid) in need(u, j2) if gid // n_seg == j)
    per_block = bkv * 2 * d * elem
    return sent * per_block, received * per_block, len(mine)


def run_sparse_case(g, U, heads_of, kv_idx, kv_cnt, q, k, v, gout, *, bq, bkv, schedule, tag):
    """Distributed sparse_kv_attention on this rank's (segment, heads) vs the full reference."""
    grid = g.grid(U)
    S, b, H, d = q.shape
    seg = S // grid.R
    ref_out, ref_dq, ref_dk, ref_dv = reference(q, k, v, gout, kv_idx, kv_cnt, bq, bkv)
    hs = torch.tensor(heads_of[grid.u])
    sl = slice(grid.j * seg, (grid.j + 1) * seg)
    nq = seg // bq
    loc = lambda t: t[sl][:, :, hs].clone()  # noqa: E731
    qh, kh, vh = (loc(t).requires_grad_() for t in (q, k, v))
    my_idx = kv_idx[:, hs, grid.j * nq:(grid.j + 1) * nq].contiguous()
    my_cnt = kv_cnt[:, hs, grid.j * nq:(grid.j + 1) * nq].contiguous()
    g.log.clear()
    out = sparse_kv_attention(qh, kh, vh, my_idx, my_cnt, g, U, block_q=bq, block_kv=bkv, schedule=schedule,
                              backend="reference")
    (out * loc(gout)).sum().backward()
    what = f"{tag} U={U} R={grid.R} {schedule} rank {g.index}"
    assert_close(out.detach(), loc(ref_out), what + " out")
    assert_close(qh.grad, loc(ref_dq), what + " dq")
    assert_close(kh.grad, loc(ref_dk), what + " dk")
    assert_close(vh.grad, loc(ref_dv), what + " dv")
    # Bytes: exactly the deduplicated remote blocks, never more than a dense ring.
    logged = sums(g.log)
    sent, recv, n_keys = closed_form_bytes(kv_idx, kv_cnt, grid, heads_of, seg, bkv, d, 8)
    got_s, got_r = logged.get("kv_data", [0, 0])
    assert (got_s, got_r) == (sent, recv), f"{what}: kv_data bytes {(got_s, got_r)} != closed form {(sent, recv)}"
    gs, gr = logged.get("kv_grad", [0, 0])
    assert (gs, gr) == (recv, sent), f"{what}: kv_grad bytes {(gs, gr)} != {(recv, sent)}"
    dense_ring = (grid.R - 1) * seg * b * len(heads_of[grid.u]) * 2 * d * 8
    assert got_r <= dense_ring and gr <= dense_ring * 1, f"{what}: more than a dense ring"
    ids_s, ids_r = logged.get("kv_ids", [0, 0])
    assert ids_r == 8 * (sent // (bkv * 2 * d * 8)) and ids_s == 8 * n_keys, f"{what}: kv_ids bytes"
    return logged


def random_selection(gen, b, H, n_q, n_kv, budgets):
    k_max = max(max(budgets), 1)
    idx = torch.full((b, H, n_q, k_max), -1, dtype=torch.int32)
    cnt = torch.zeros(b, H, n_q, dtype=torch.int32)
    for bb in range(b):
        for h in range(H):
            for i in range(n_q):
                kk = budgets[h]
                ids = torch.randperm(n_kv, generator=gen)[:kk].sort().values
                idx[bb, h, i, :kk] = ids.to(torch.int32)
                cnt[bb, h, i] = kk
    return idx, cnt


def check_sparse(g, configs, *, S, b=2, H=6, d=8, bq=16, bkv=16, seed=0):
    q, k, v, gout = make_problem(seed, S, b, H, d)
    n_q, n_kv = S // bq, S // bkv
    gen = torch.Generator().manual_seed(seed + 1)
    for U in configs:
        grid = g.grid(U)
        seg, nq = S // grid.R, S // grid.R // bq
        heads_of = uneven_heads(H, U, 1)
        # Random budgets (one per head) and random selections.
        budgets = [int(x) for x in torch.randint(0, n_kv + 1, (H,), generator=gen)]
        idx, cnt = random_selection(gen, b, H, n_q, n_kv, budgets)
        for schedule in ("gather", "ring"):
            run_sparse_case(g, U, heads_of, idx, cnt, q, k, v, gout, bq=bq, bkv=bkv, schedule=schedule, tag="random")
        # Adversarial 1: every block selected by every query block.
        full = torch.arange(n_kv, dtype=torch.int32).expand(b, H, n_q, n_kv).contiguous()
        run_sparse_case(g, U, heads_of, full, torch.full((b, H, n_q), n_kv, dtype=torch.int32), q, k, v, gout,
                        bq=bq, bkv=bkv, schedule="ring", tag="every-block")
        # Adversarial 2: head 0 dense, the others one block or nothing.
        budgets = [n_kv] + [h % 2 for h in range(1, H)]
        idx, cnt = random_selection(gen, b, H, n_q, n_kv, budgets)
        idx[:, 0], cnt[:, 0] = full[:, 0], n_kv
        for schedule in ("gather", "ring"):
            run_sparse_case(g, U, heads_of, idx, cnt, q, k, v, gout, bq=bq, bkv=bkv, schedule=schedule,
                            tag="one-dense-head")
        if grid.R > 1:
            # Adversarial 3: segment 0 needs only its own blocks (a rank needing nothing) but serves everyone;
            # query blocks select only remote blocks, or nothing (count 0) every other block.
            n_seg = seg // bkv
            idx = torch.full((b, H, n_q, 2), -1, dtype=torch.int32)
            cnt = torch.zeros(b, H, n_q, dtype=torch.int32)
            for i in range(n_q):
                if i // nq == 0:
                    idx[:, :, i, 0], cnt[:, :, i] = i % n_seg, 1
                elif i % 2 == 0:
                    idx[:, :, i, 0], idx[:, :, i, 1] = 0, n_seg - 1   # only segment 0's blocks (remote)
                    cnt[:, :, i] = 2
            for schedule in ("gather", "ring"):
                logged = run_sparse_case(g, U, heads_of, idx, cnt, q, k, v, gout, bq=bq, bkv=bkv,
                                         schedule=schedule, tag="remote-only/nothing")
                if grid.j == 0:
                    assert logged.get("kv_data", [0, 0])[1] == 0, "segment 0 should receive nothing"
            # Adversarial 4: all selections local -> every exchange skipped on every rank.
            idx = torch.stack([(torch.arange(n_q) // nq) * n_seg + (torch.arange(n_q) % n_seg)], -1)
            idx = idx.to(torch.int32).view(1, 1, n_q, 1).expand(b, H, n_q, 1).contiguous()
            cnt = torch.ones(b, H, n_q, dtype=torch.int32)
            for schedule in ("gather", "ring"):
                logged = run_sparse_case(g, U, heads_of, idx, cnt, q, k, v, gout, bq=bq, bkv=bkv,
                                         schedule=schedule, tag="all-local")
                assert "kv_data" not in logged and "kv_ids" not in logged and "kv_grad" not in logged, \
                    f"empty exchange not skipped: {logged}"


# ------------------------------------------------------------------------------------------ entry points
def check_entry_points(g, configs, *, s_local=32, b=2, H=6, d=8, r=4, bq=16, bkv=16, seed=5):
    P = g.size
    S = s_local * P
    q, k, v, gout = make_problem(seed, S, b, H, d)
    gen = torch.Generator().manual_seed(seed + 1)
    wq, wk = (torch.randn(H, d, r, generator=gen, dtype=F64) for _ in range(2))
    n_kv = S // bkv
    budgets = torch.tensor([n_kv, 1, 3, 0, 2, 5][:H], dtype=torch.int64)
    # Single-process reference: selection on the whole sequence, then sparse attention.
    q_lr = torch.einsum("sbhd,hdr->bshr", q, wq)
    k_lr = torch.einsum("sbhd,hdr->bshr", k, wk)
    idx, cnt = select_blocks(q_lr, k_lr, budgets, block_q=bq, block_kv=bkv, backend="reference")
    ref_out, ref_dq, ref_dk, ref_dv = reference(q, k, v, gout, idx, cnt, bq, bkv)
    sl = slice(g.index * s_local, (g.index + 1) * s_local)
    for U in configs:
        grid = g.grid(U)
        nq = S // grid.R // bq
        variants = [("gather", "lpt"), ("ring", "lpt")] + ([("gather", "split"), ("ring", "split")] if U > 1 else [])
        for schedule, assignment in variants:
            costs = [float(x) for x in budgets]
            costs[0] = 3 * sum(costs)   # head 0 far above the mean rank load: "split" must share it
            pl = fixed_plan(P, U, H, schedule=schedule, assignment=assignment, costs=costs, n_units=nq)
            if assignment == "split":
                assert sum(len(h) for h in pl.heads_of) > H, "test needs a split head"
            ql, kl, vl = (t[sl].clone().requires_grad_() for t in (q, k, v))
            out, (my_idx, my_cnt) = dsv_cp_attention(ql, kl, vl, wq, wk, budgets, group=g, plan=pl, block_q=bq,
                                                     block_kv=bkv, backend="reference", return_selection=True)
            hs = torch.tensor(pl.heads_of[grid.u])
            expect_cnt = cnt[:, hs, grid.j * nq:(grid.j + 1) * nq].clone()
            k_max = my_idx.shape[-1]
            expect_idx = idx[:, hs, grid.j * nq:(grid.j + 1) * nq, :k_max].clone()
            for i, (lo, hi, parts) in enumerate(pl.shares[grid.u] if pl.shares else []):
                rows = torch.arange(nq)
                outside = (rows < lo * nq // parts) | (rows >= hi * nq // parts)
                expect_cnt[:, i, outside] = 0
                expect_idx[:, i, outside] = -1
            assert torch.equal(my_cnt, expect_cnt), "selection counts differ"
            assert torch.equal(my_idx, expect_idx), "selection differs"
            (out * gout[sl]).sum().backward()
            what = f"dsv_cp_attention U={U} {schedule} {assignment} rank {g.index}"
            assert_close(out.detach(), ref_out[sl], what + " out")
            assert_close(ql.grad, ref_dq[sl], what + " dq")
            assert_close(kl.grad, ref_dk[sl], what + " dk")
            assert_close(vl.grad, ref_dv[sl], what + " dv")
            with torch.no_grad():   # inference: no graph kept, same result
                out_ng = dsv_cp_attention(q[sl], k[sl], v[sl], wq, wk, budgets, group=g, plan=pl, block_q=bq,
                                          block_kv=bkv, backend="reference")
            assert not out_ng.requires_grad
            assert_close(out_ng, ref_out[sl], what + " no_grad out")
        # Stage 1: dense through head all-to-all, against the dense reference.
        qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
        dref = dense_attention_reference(qd, kd, vd, scale=d ** -0.5, layout="sbhd")
        (dref * gout).sum().backward()
        ql, kl, vl = (t[sl].clone().requires_grad_() for t in (q, k, v))
        heads_of = uneven_heads(H, U, 2)
        out, (mine, q_seg, k_full) = dense_cp_attention(ql, kl, vl, group=g, U=U, heads_of=heads_of,
                                                        return_heads=True)
        (out * gout[sl]).sum().backward()
        what = f"dense_cp_attention U={U} rank {g.index}"
        assert_close(out.detach(), dref.detach()[sl], what + " out")
        assert_close(ql.grad, qd.grad[sl], what + " dq")
        assert_close(kl.grad, kd.grad[sl], what + " dk")
        assert_close(vl.grad, vd.grad[sl], what + " dv")
        seg = S // grid.R
        assert mine == heads_of[grid.u]
        assert torch.equal(q_seg, q[grid.j * seg:(grid.j + 1) * seg][:, :, list(mine)]), "stage-1 q handed back"
        assert torch.equal(k_full, k[:, :, list(mine)]), "stage-1 k handed back (whole sequence)"


# ------------------------------------------------------------------------------------------ packed clips
def packed_clips(S, align):
    """Clips of mixed lengths (tiny ones, ones spanning ranks), each at a multiple of `align`,
    filling a packed sequence of exactly S tokens (the last one cut to fit)."""
    lengths, pos = [], 0
    for n in [40, 5, 150, 70, 3, 100, 33, 64, 90] * 8:
        if pos >= S:
            break
        n = min(n, S - pos)
        lengths.append(n)
        pos = -(-(pos + n) // align) * align
    return Segments(lengths, align=align, total=S)


def check_packed(g, configs, *, backend="reference", dtype=F64, s_local=64, b=1, H=6, d=8, r=4, bq=16, bkv=16,
                 seed=13, device=torch.device("cpu"), tol=1e-5):
    """dsv_cp_attention and dense_cp_attention on packed clips against one process running the packed
    reference ops on the whole sequence (float64, on the CPU): selection rows, out, dq, dk, dv. The
    reference's padding holds random values, the ranks' NaN: neither may reach real tokens, and padding
    gets zero gradients. The ranks' tensors live on `device`; tol: relative error allowed below float64."""
    P = g.size
    S = s_local * P
    seg = packed_clips(S, max(bq, bkv))
    gen = torch.Generator().manual_seed(seed)
    q, k, v, gout = (torch.randn(S, b, H, d, generator=gen, dtype=F64) for _ in range(4))
    wq, wk = (torch.randn(H, d, r, generator=gen, dtype=F64) for _ in range(2))
    clip_blocks = torch.tensor(seg.blocks_per_clip(bkv))
    budgets = torch.randint(0, 4, (H, len(seg)), generator=gen)
    budgets[0] = clip_blocks + 1     # a dense head (more than any clip has)
    budgets[1, ::2] = 0              # clips whose queries select nothing
    with torch.no_grad():
        q_lr, k_lr = torch.einsum("sbhd,hdr->bshr", q, wq), torch.einsum("sbhd,hdr->bshr", k, wk)
        idx, cnt = select_blocks(q_lr, k_lr, budgets, block_q=bq, block_kv=bkv, backend="reference", segments=seg)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = block_sparse_attention(qr, kr, vr, idx, cnt, block_q=bq, block_kv=bkv, layout="sbhd",
                                 backend="reference", segments=seg)
    (ref * gout).sum().backward()
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    dref = dense_attention(qd, kd, vd, layout="sbhd", segments=seg)
    (dref * gout).sum().backward()
    sl = slice(g.index * s_local, (g.index + 1) * s_local)
    pad = ~seg.token_valid(torch.device("cpu"))[sl]

    def local(t):   # this rank's shard, NaN in its padding
        return t[sl].clone().to(device, dtype).masked_fill(pad.to(device).view(-1, 1, 1, 1),
                                                          float("nan")).requires_grad_()

    def close(a, ref, what):
        a = a.cpu()
        if dtype == F64:
            assert_close(a, ref, what)
        else:
            err = rel_err(a.double(), ref)
            assert err < tol, f"{what}: relative error {err:.2e}"

    work = (budgets.double() * torch.tensor(seg.blocks_per_clip(bq))).sum(1).tolist()
    for U in configs:
        grid = g.grid(U)
        nq = S // grid.R // bq
        variants = [("gather", "lpt"), ("ring", "lpt")] + ([("ring", "split")] if U > 1 else [])
        for schedule, assignment in variants:
            pl = fixed_plan(P, U, H, schedule=schedule, assignment=assignment, costs=work, n_units=nq)
            ql, kl, vl = (local(t) for t in (q, k, v))
            out, (my_idx, my_cnt) = dsv_cp_attention(ql, kl, vl, wq.to(device, dtype), wk.to(device, dtype), budgets,
                                                     group=g,
                                                     plan=pl, block_q=bq, block_kv=bkv, backend=backend,
                                                     return_selection=True, segments=seg)
            what = f"packed dsv_cp_attention {backend} U={U} {schedule} {assignment} rank {g.index}"
            if assignment == "lpt":  # this rank's rows of the whole sequence's selection
                hs = torch.tensor(pl.heads_of[grid.u])
                rows = slice(grid.j * nq, (grid.j + 1) * nq)
                assert torch.equal(my_cnt.cpu(), cnt[:, hs, rows]), what + ": selection counts differ"
                k_max = my_idx.shape[-1]
                assert torch.equal(my_idx.cpu(), idx[:, hs, rows, :k_max]), what + ": selection differs"
            (out * gout[sl].to(device, dtype)).sum().backward()
            close(out.detach(), ref.detach()[sl], what + " out")
            close(ql.grad, qr.grad[sl], what + " dq")
            close(kl.grad, kr.grad[sl], what + " dk")
            close(vl.grad, vr.grad[sl], what + " dv")
        ql, kl, vl = (local(t) for t in (q, k, v))
        out, (mine, q_seg, k_full) = dense_cp_attention(ql, kl, vl, group=g, U=U, return_heads=True, segments=seg)
        (out * gout[sl].to(device, dtype)).sum().backward()
        what = f"packed dense_cp_attention U={U} rank {g.index}"
        close(out.detach(), dref.detach()[sl], what + " out")
        close(ql.grad, qd.grad[sl], what + " dq")
        close(kl.grad, kd.grad[sl], what + " dk")
        close(vl.grad, vd.grad[sl], what + " dv")


def check_plan_sync(g):
    shape = Shape(seq_len=4096, heads=6, head_dim=64)
    pl = plan([0.9, 0.05, 0.1, 0.02, 0.3, 0.07], shape=shape, P=g.size, max_U=g.size)
    check_plan_identical(pl, g)
    # A plan that differs on rank 0 only: every rank must detect it.
    other = fixed_plan(g.size, 1, 6, schedule="ring" if g.index == 0 else "gather")
    try:
        check_plan_identical(other, g)
    except RuntimeError:
        pass
    else:
        raise AssertionError("check_plan_identical missed a differing plan")
    # Per-head statistics measured on different heads become identical everywhere.
    H = 6
    heads = torch.tensor([h for h in range(H) if h % g.size == g.index % g.size] or [0])
    stats = torch.arange(H, dtype=F64) + g.index
    got = allreduce_head_stats(stats, g, heads)
    ranks_of = {h: [c for c in range(g.size) if h in ([x for x in range(H) if x % g.size == c % g.size] or [0])]
                for h in range(H)}
    expect = torch.tensor([h + sum(ranks_of[h]) / len(ranks_of[h]) for h in range(H)], dtype=F64)
    assert torch.allclose(got, expect, rtol=0, atol=1e-12), (got, expect)


def check_errors(g):
    """Bad input raises ValueError naming the problem (on every rank, before any collective)."""
    P = g.size
    q = torch.zeros(16, 1, 2, 8, dtype=F64)
    w = torch.zeros(2, 8, 4, dtype=F64)
    pl = fixed_plan(P, 1, 2)
    cases = [
        (lambda: dsv_cp_attention(q[:8], q[:8], q[:8], w, w, [1, 1], group=g, plan=pl, block_q=16, block_kv=16),
         "multiple of block_q"),
        (lambda: dsv_cp_attention(q, q, q, w, w, [1, 1], group=g, plan=fixed_plan(P + 1, 1, 2), block_q=16,
                                  block_kv=16), "P="),
        (lambda: dsv_cp_attention(q, q, q, w[:1], w[:1], [1, 1], group=g, plan=pl, block_q=16, block_kv=16),
         "wq_lr"),
        (lambda: dsv_cp_attention(q, q, q, w, w, [1.5, 0.1], group=g, plan=pl, block_q=16, block_kv=16),
         r"\[0, 1\]"),
        (lambda: seq_to_head(q, g, 1, ((0,),)), "each of the 2 heads"),
        (lambda: seq_to_head(q, g, 1, ((0, 0, 1),)), "distinct"),
        (lambda: sparse_kv_attention(q, q, q, torch.zeros(1, 2, 1, 1, dtype=torch.int32),
                                     torch.ones(1, 2, 1, dtype=torch.int32), g, 1, block_q=16, block_kv=16,
                                     schedule="tree"), "schedule"),
    ]
    if P > 1:
        cases.append((lambda: dense_cp_attention(q, q, q, group=g, U=2 if P % 2 == 0 else P,
                                                 heads_of=((0, 1), (0,)) + ((1,),) * ((2 if P % 2 == 0 else P) - 2)),
                      "exactly once"))
    import re
    for fn, pattern in cases:
        try:
            fn()
        except ValueError as e:
            assert re.search(pattern, str(e)), f"error {e!r} does not name {pattern!r}"
        else:
            raise AssertionError(f"no ValueError for the {pattern!r} case")


def check_triton(g, *, s_local=32, b=1, H=4, d=32, r=4, bq=16, bkv=16):
    """The Triton backend (TRITON_INTERPRET=1 on CPU, float32) behind the CP entry point: strided
    views of padded KV buffers, sbhd queries read as bshd. Both schedules, the ring included (it merges
    partial results through the kernel's differentiable log-sum-exp)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "launch the triton suite with TRITON_INTERPRET=1"
    P = g.size
    S = s_local * P
    gen = torch.Generator().manual_seed(3)
    q, k, v, gout = (torch.randn(S, b, H, d, generator=gen) for _ in range(4))
    wq, wk = (torch.randn(H, d, r, generator=gen) for _ in range(2))
    budgets = torch.tensor([S // bkv, 1, 3, 2])
    q_lr, k_lr = torch.einsum("sbhd,hdr->bshr", q, wq), torch.einsum("sbhd,hdr->bshr", k, wk)
    idx, cnt = select_blocks(q_lr, k_lr, budgets, block_q=bq, block_kv=bkv, backend="reference")
    ref_out, ref_dq, ref_dk, ref_dv = reference(*(t.double() for t in (q, k, v, gout)), idx, cnt, bq, bkv)
    sl = slice(g.index * s_local, (g.index + 1) * s_local)
    for U in [u for u in range(1, P + 1) if P % u == 0]:
        for schedule in ("gather", "ring"):
            pl = fixed_plan(P, U, H, schedule=schedule, assignment="lpt", costs=[float(x) for x in budgets])
            ql, kl, vl = (t[sl].clone().requires_grad_() for t in (q, k, v))
            out = dsv_cp_attention(ql, kl, vl, wq, wk, budgets, group=g, plan=pl, block_q=bq, block_kv=bkv,
                                   backend="triton")
            (out * gout[sl]).sum().backward()
            for name, a, ref in (("out", out.detach(), ref_out), ("dq", ql.grad, ref_dq), ("dk", kl.grad, ref_dk),
                                 ("dv", vl.grad, ref_dv)):
                err = rel_err(a.double(), ref[sl])
                assert err < 1e-5, f"triton U={U} {schedule} {name}: relative error {err:.2e}"


# ------------------------------------------------------------------------------------------ suites
def suite(name, world):
    g = HybridCPGroup(record=True)
    divisors = [u for u in range(1, world + 1) if world % u == 0 and u <= 6]
    if name == "layout":
        check_layout(g)
        check_plan_sync(g)
        check_errors(g)
    elif name == "sparse":
        check_sparse(g, divisors, S=32 * world if world % 3 else 16 * world * 2)
    elif name == "entry":
        check_entry_points(g, divisors)
    elif name == "packed":
        check_packed(g, divisors)
    elif name == "triton":
        check_triton(g)
        check_packed(g, [1, world], backend="triton", dtype=torch.float32, H=2, d=32)
    elif name == "subgroups":
        # Two CP groups of non-contiguous global ranks (as Megatron lays out TP x CP); U x R = 2 x 2 each.
        evens, odds = [0, 2, 4, 6], [1, 3, 5, 7]
        pg_e, pg_o = dist.new_group(evens), dist.new_group(odds)
        mine = evens if dist.get_rank() % 2 == 0 else odds
        sub = HybridCPGroup(pg_e if mine is evens else pg_o, mine, record=True)
        check_layout(sub, H=5)
        check_entry_points(sub, [2], seed=11 + dist.get_rank() % 2)
    else:
        raise ValueError(name)


def run_checks(checks) -> None:
    """checks() on this rank, then a barrier. A failure prints its traceback and exits with status 1 at once:
    waiting for peers that may be stuck would hang instead of failing."""
    try:
        checks()
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


def main():
    name, world, rank, init = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", world_size=world, rank=rank,
                            timeout=timedelta(seconds=60))
    run_checks(lambda: [suite(part, world) for part in name.split("+")])
    # Every check passed. Leave without running C++ static destructors: under load a library thread
    # still joinable at interpreter teardown aborts the process ("terminate called without an
    # active exception") after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
