"""Collectives of the hybrid scheme and the uneven head all-to-all (with autograd).

Every collective here runs over the whole CP group (see groups.py): a rank only has
non-zero splits towards the peers it really exchanges with, so the all-to-alls of all
U groups (or all R groups) happen in one call. Callers must call these on every CP rank
in the same order; a call whose volume is zero on every rank may be skipped, but only
by a decision that every rank takes from the same data.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .groups import Grid, HybridCPGroup


def block_all_to_all(group: HybridCPGroup, sends: Dict[int, torch.Tensor], recv_numel: Dict[int, int], *,
                     dtype: torch.dtype, device: torch.device, name: str) -> Dict[int, torch.Tensor]:
    """Send ``sends[c]`` (any shape, flattened) to CP index c; receive ``recv_numel[c]`` elements from c.

    Returns {c: 1-D tensor} for every c in recv_numel. Peers missing from a dict exchange nothing.
    """
    P = group.size
    send_splits = [0] * P
    parts = []
    for c in range(P):
        t = sends.get(c)
        if t is not None and t.numel():
            if t.dtype != dtype:
                raise ValueError(f"{name}: sending {t.dtype} in a {dtype} all-to-all")
            parts.append(t.reshape(-1))
            send_splits[c] = t.numel()
    recv_splits = [int(recv_numel.get(c, 0)) for c in range(P)]
    send_buf = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
    recv_buf = torch.empty(sum(recv_splits), dtype=dtype, device=device)
    dist.all_to_all_single(recv_buf, send_buf, recv_splits, send_splits, group=group.group)
    me = group.index
    elem = torch.empty((), dtype=dtype).element_size()
    group.note(name, elem * (sum(send_splits) - send_splits[me]), elem * (sum(recv_splits) - recv_splits[me]))
    out, offset = {}, 0
    for c in range(P):
        if c in recv_numel:
            out[c] = recv_buf[offset:offset + recv_splits[c]]
        offset += recv_splits[c]
    return out


def all_gather_ints(group: HybridCPGroup, values: torch.Tensor) -> torch.Tensor:
    """All-gather an int64 vector of equal length from every CP rank -> [P, n] on the CPU (small metadata)."""
    values = values.to(group.device, torch.int64).contiguous()
    out = [torch.empty_like(values) for _ in range(group.size)]
    dist.all_gather(out, values, group=group.group)
    group.note("meta", values.numel() * 8 * (group.size - 1), values.numel() * 8 * (group.size - 1))
    return torch.stack(out).cpu()


def _u_all_to_all(group: HybridCPGroup, grid: Grid, send: torch.Tensor, send_numel, recv_numel,
                  pending: Optional[List] = None) -> torch.Tensor:
    """All-to-all within my U group of flat buffers laid out peer by peer in u order (the CP order of
    the U group); send_numel[u2] / recv_numel[u2]: elements to / from U-rank u2. Returns the flat
    receive buffer, in u order too, so callers view it instead of copying pieces out of it. With
    `pending` (a list), the collective is only started and its work handle appended."""
    send_splits, recv_splits = [0] * group.size, [0] * group.size
    for u2, c in enumerate(grid.u_peers):
        send_splits[c], recv_splits[c] = int(send_numel[u2]), int(recv_numel[u2])
    recv = torch.empty(sum(recv_splits), dtype=send.dtype, device=send.device)
    work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group.group,
                                  async_op=pending is not None)
    if pending is not None:
        pending.append(work)
    me, elem = group.index, send.element_size()
    group.note("head_a2a", elem * (sum(send_splits) - send_splits[me]), elem * (sum(recv_splits) - recv_splits[me]))
    return recv


def _words_ok(t: torch.Tensor) -> bool:
    """Whether t can be viewed with 8-byte elements (rows, strides and offset in whole words)."""
    esz = t.element_size()
    return ((t.shape[-1] * esz) % 8 == 0 and t.stride(-1) == 1 and (t.storage_offset() * esz) % 8 == 0
            and all((st * esz) % 8 == 0 for st in t.stride()[:-1]))


def _copy_heads(dst: torch.Tensor, dst_heads, src: torch.Tensor, src_heads) -> None:
    """dst[:, :, dst_heads[i]] = src[:, :, src_heads[i]] for [s, b, heads, D] tensors, one strided copy
    of 8-byte words per head. For a 32k x 16 x 128 bf16 shard on H200 (bench/head_copies.py,
    bench/results/cp_h200x2/head_copies_h200.txt) the gather took 0.18 ms against 0.33 ms for
    index_select along the head dim, which walks 2-byte elements; copies of 2-byte elements back
    took 0.22 ms against 0.26 ms for index_copy_."""
    if _words_ok(dst) and _words_ok(src):   # both or neither: the copies need equal element types
        dst, src = dst.view(torch.int64), src.view(torch.int64)
    for i, j in zip(dst_heads, src_heads):
        dst[:, :, i].copy_(src[:, :, j])


def _seq_to_head(x, group: HybridCPGroup, grid: Grid, heads_of, pending=None):
    """[s_local, b, H, D] -> [U * s_local, b, |heads_of[u]|, D] (segment of the U group, my heads).
    One copy into the send buffer (each peer's heads gathered in place), none out of the receive buffer."""
    s, b, _, D = x.shape
    n_of = [len(hs) for hs in heads_of]
    unit = s * b * D
    send = torch.empty(unit * sum(n_of), dtype=x.dtype, device=x.device)
    off = 0
    for hs, n in zip(heads_of, n_of):
        _copy_heads(send[off:off + unit * n].view(s, b, n, D), range(n), x, hs)
        off += unit * n
    n_me = n_of[grid.u]
    recv = _u_all_to_all(group, grid, send, [unit * n for n in n_of], [unit * n_me] * grid.U, pending)
    return recv.view(grid.U * s, b, n_me, D)


def _head_to_seq(y, group: HybridCPGroup, grid: Grid, heads_of, H):
    """[U * s_local, b, |heads_of[u]|, D] -> [s_local, b, H, D]: the adjoint of _seq_to_head
    (a head held by several ranks, split along its queries, gets the sum of their parts). The send
    buffer is y itself (its U segments are the peers' pieces, in u order)."""
    seg, b, n_me, D = y.shape
    s = seg // grid.U
    n_of = [len(hs) for hs in heads_of]
    unit = s * b * D
    recv = _u_all_to_all(group, grid, y.contiguous().view(-1), [unit * n_me] * grid.U, [unit * n for n in n_of])
    partition = sum(n_of) == H
    out = y.new_empty(s, b, H, D) if partition else y.new_zeros(s, b, H, D)
    off = 0
    for hs, n in zip(heads_of, n_of):   # fixed order: deterministic sums
        piece = recv[off:off + unit * n].view(s, b, n, D)
        if partition:
            _copy_heads(out, hs, piece, range(n))
        else:
            out.index_add_(2, torch.tensor(hs, device=y.device), piece)
        off += unit * n
    return out


class _HeadAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, grid, heads_of, H, to_heads, pending):
        ctx.args = (group, grid, heads_of, H, to_heads)
        with group.phase("a2a", x.device):
            if to_heads:
                return _seq_to_head(x, group, grid, heads_of, pending)
            return _head_to_seq(x, group, grid, heads_of, H)

    @staticmethod
    def backward(ctx, g):
        group, grid, heads_of, H, to_heads = ctx.args
        with group.phase("a2a_bwd", g.device):
            g = g.contiguous()
            back = _head_to_seq(g, group, grid, heads_of, H) if to_heads else _seq_to_head(g, group, grid, heads_of)
        return back, None, None, None, None, None, None


def check_heads_of(heads_of, U: int, H: int, *, partition: bool = False) -> None:
    """Every head held by at least one rank (exactly one if partition), at most once per rank."""
    if len(heads_of) != U:
        raise ValueError(f"heads_of has {len(heads_of)} entries but U={U}")
    for hs in heads_of:
        if len(set(hs)) != len(hs) or any(not 0 <= h < H for h in hs):
            raise ValueError(f"heads_of[u] must list distinct heads in [0, {H}), got {hs}")
    held = sorted(h for hs in heads_of for h in hs)
    if sorted(set(held)) != list(range(H)) or (partition and len(held) != H):
        what = "exactly once" if partition else "at least once"
        raise ValueError(f"heads_of must list each of the {H} heads {what}, got {heads_of}")


def seq_to_head(x: torch.Tensor, group: HybridCPGroup, U: int, heads_of, pending: Optional[List] = None) -> torch.Tensor:
    """Head all-to-all within the U group, differentiable.

    x: this rank's sequence shard [s_local, b, H, D] (sbhd). heads_of[u]: the global head ids that
    U-rank u computes (uneven counts allowed; every head at least once: a head given to several
    ranks is sent to each of them, and :func:`head_to_seq` sums their results).
    Returns [U * s_local, b, len(heads_of[u]), D]: the contiguous segment of the U group
    (tokens of U-ranks 0..U-1 in order) for this rank's heads, in heads_of[u] order.
    pending: a list; when given, the forward all-to-all is only started and its work handle
    appended (none when nothing moves): the result must not be read before each is waited for.
    The backward is not affected.
    """
    if x.dim() != 4:
        raise ValueError(f"seq_to_head expects [s_local, b, heads, d], got {tuple(x.shape)}")
    H = x.shape[2]
    check_heads_of(heads_of, U, H)
    if U == 1 and tuple(heads_of[0]) == tuple(range(H)):   # one rank holds every head: nothing moves
        return x
    return _HeadAllToAll.apply(x, group, group.grid(U), tuple(map(tuple, heads_of)), H, True, pending)


def head_to_seq(y: torch.Tensor, group: HybridCPGroup, U: int, heads_of, heads: int = None) -> torch.Tensor:
    """Adjoint of :func:`seq_to_head`: [U * s_local, b, n_u, D] -> [s_local, b, H, D], differentiable.

    A head held by several ranks receives the sum of their values (each computes a disjoint share
    of the head's queries and zeros elsewhere). heads: H (default: the largest head id + 1).
    """
    if y.dim() != 4 or y.shape[0] % U:
        raise ValueError(f"head_to_seq expects [U * s_local, b, heads_u, d] with U={U}, got {tuple(y.shape)}")
    grid = group.grid(U)
    H = heads if heads is not None else 1 + max(h for hs in heads_of for h in hs)
    check_heads_of(heads_of, U, H)
    if y.shape[2] != len(heads_of[grid.u]):
        raise ValueError(f"rank holds {y.shape[2]} heads but the plan gives it {len(heads_of[grid.u])}")
    if U == 1 and tuple(heads_of[0]) == tuple(range(H)):
        return y
    return _HeadAllToAll.apply(y, group, grid, tuple(map(tuple, heads_of)), H, False, None)


def _gather_segments(x, group: HybridCPGroup, grid: Grid):
    """[seg, ...] on every rank of my R group -> [R * seg, ...] (segments in j order)."""
    sends = {c: x for c in grid.r_peers if c != grid.index}
    recv = {c: x.numel() for c in grid.r_peers if c != grid.index}
    got = block_all_to_all(group, sends, recv, dtype=x.dtype, device=x.device, name="seq_gather")
    return torch.cat([x if c == grid.index else got[c].view_as(x) for c in grid.r_peers], dim=0)


def _scatter_sum_segments(g, group: HybridCPGroup, grid: Grid):
    """Backward of _gather_segments: each segment's gradient goes to its owner, which sums them."""
    seg = g.shape[0] // grid.R
    sends = {c: g[j * seg:(j + 1) * seg] for j, c in enumerate(grid.r_peers) if c != grid.index}
    recv = {c: g[:seg].numel() for c in grid.r_peers if c != grid.index}
    got = block_all_to_all(group, sends, recv, dtype=g.dtype, device=g.device, name="seq_gather")
    out = g[grid.j * seg:(grid.j + 1) * seg].clone()
    for c in grid.r_peers:   # fixed order: deterministic sum
        if c != grid.index:
            out += got[c].view_as(out)
    return out


class _GatherSegments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, grid):
        ctx.args = (group, grid)
        return _gather_segments(x.contiguous(), group, grid)

    @staticmethod
    def backward(ctx, g):
        group, grid = ctx.args
        with group.phase("gather_bwd", g.device):
            return _scatter_sum_segments(g.contiguous(), group, grid), None, None


def gather_segments(x: torch.Tensor, group: HybridCPGroup, U: int) -> torch.Tensor:
    """All-gather along dim 0 within the R group, differentiable: [seg, ...] -> [R * seg, ...].

    After :func:`seq_to_head` the R ranks sharing this rank's heads hold the R segments of the
    sequence; this returns the whole sequence for those heads (a dense exchange: used by the
    stage-1 dense path and for the small low-rank keys of the selection).
    """
    grid = group.grid(U)
    if grid.R == 1:
        return x
    return _GatherSegments.apply(x, group, grid)
