"""Sparse KV exchange within the R group, fused with block-sparse attention (autograd).

After the head all-to-all, the R ranks of one sequence-parallel group hold the same heads
for the R segments of the sequence. Each query block selected a few KV blocks by global
id; a rank receives only the (batch, head, block) triples that at least one of its query
blocks selected and another rank owns, each once (deduplicated).

Protocol (every step is taken by every CP rank in the same order):
  1. each rank lists its remote triples per owner -> request counts; an all-gather makes
     the P x P count matrix known everywhere, so every rank skips the same empty transfers;
  2. the request ids go to their owners (one all-to-all);
  3. the owners send the packed K|V blocks, by one of two schedules:
     "gather": one all-to-all of all blocks, then a single attention call over
                [local segment | received blocks];
     "ring":    R - 1 rounds; in round t a rank receives from the owner t places before it
                and serves the rank t places after it; round t's attention runs while round
                t+1's blocks are in flight. Partial outputs are merged through their
                log-sum-exp (rows without keys in a round weigh zero, so a query block
                that selected nothing, or only remote blocks, stays finite).
  Backward computes the gradients of the local queries and of every KV buffer, returns the
  gradients of received blocks to their owners by the same schedule and adds them there.

Received blocks are kept for backward (as attention keeps its keys); the ring bounds the
transient send/receive buffers to one round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..ops import block_sparse_attention
from .all_to_all import all_gather_ints, block_all_to_all
from .groups import Grid, HybridCPGroup

SCHEDULES = ("gather", "ring")


@dataclass
class _Part:
    """One attention call: the local queries over one KV buffer."""

    kv_idx: torch.Tensor                  # [b, n, n_q, k_max] ids into this part's buffer
    kv_cnt: torch.Tensor                  # [b, n, n_q]
    kv_lens: Optional[torch.Tensor] = None  # [1 or b*n, buffer blocks] valid keys per block (packed clips)
    recv: Optional[torch.Tensor] = None   # received packed blocks [m, block_kv, 2d]; a leaf in backward
    bh: Optional[torch.Tensor] = None     # (batch * n + head) of each received block
    slot: Optional[torch.Tensor] = None   # its slot in the per-(batch, head) padded buffer
    n_slots: int = 0


def _remap(in_part, slot_of_entry):
    """kv_idx/kv_cnt of one part: the selected entries that live in it, compacted and ascending."""
    big = torch.iinfo(torch.int64).max
    ids = torch.where(in_part, slot_of_entry, big).sort(dim=-1).values
    kv_idx = torch.where(ids == big, -1, ids).to(torch.int32)
    return kv_idx, in_part.sum(-1).to(torch.int32)


class _Exchange:
    """Who requested which blocks from whom (R > 1); shared by forward and backward."""

    def __init__(self, group: HybridCPGroup, grid: Grid, kv_idx, kv_cnt, *, seg_tokens, block_kv, kv_lens=None):
        self.group, self.grid = group, grid
        self.kv_lens = kv_lens  # int [n_kv_total] valid keys of every global block, or None
        b, n, _, k_max = kv_idx.shape
        self.b, self.n = b, n
        self.n_seg = seg_tokens // block_kv
        self.n_kv_total = self.n_seg * grid.R
        device = kv_idx.device
        self.valid = torch.arange(k_max, device=device) < kv_cnt.unsqueeze(-1).long()
        g = torch.where(self.valid, kv_idx.long(), 0)
        if bool(((g < 0) | (g >= self.n_kv_total)).any()):
            raise ValueError(f"kv_idx holds a block id outside [0, {self.n_kv_total}) within kv_cnt")
        bh = torch.arange(b * n, device=device).view(b, n, 1, 1)
        self.entry_key = bh * self.n_kv_total + g        # one int per (batch, head, block)
        self.entry_owner = g // self.n_seg                # R index of the owner
        uniq = torch.unique(self.entry_key[self.valid])   # sorted and deduplicated
        owner = (uniq % self.n_kv_total) // self.n_seg
        self.requests = {jo: uniq[owner == jo] for jo in range(grid.R) if jo != grid.j}
        self.served = {}                                  # requester CP index -> keys it asked me for
        counts = torch.zeros(group.size, dtype=torch.int64)
        for jo, keys in self.requests.items():
            counts[grid.at(grid.u, jo)] = keys.numel()
        self.matrix = all_gather_ints(group, counts)     # [P, P]: row asks column for this many blocks
        if int(self.matrix.sum()):
            sends = {grid.at(grid.u, jo): keys for jo, keys in self.requests.items()}
            recv = {c: self.serve_count(c) for c in grid.r_peers if c != grid.index}
            got = block_all_to_all(group, sends, recv, dtype=torch.int64, device=device, name="kv_ids")
            self.served = {c: t for c, t in got.items() if t.numel()}

    def owner_c(self, jo):
        return self.grid.at(self.grid.u, jo)

    def recv_count(self, owner_c):
        return int(self.matrix[self.grid.index, owner_c])

    def serve_count(self, requester_c):
        return int(self.matrix[requester_c, self.grid.index])

    # ----------------------------------------------------------------- owner side
    def _decode(self, keys):
        bh, g = keys // self.n_kv_total, keys % self.n_kv_total
        return bh // self.n, bh % self.n, g - self.grid.j * self.n_seg

    def pack(self, kvb, requester_c):
        """Packed K|V blocks a requester asked for: [m, block_kv, 2d]."""
        return kvb[self._decode(self.served[requester_c])]

    def accumulate(self, dkvb, requester_c, grads):
        dkvb.index_put_(self._decode(self.served[requester_c]), grads, accumulate=True)

    # ----------------------------------------------------------------- requester side
    def local_entries(self):
        """Mask of entries owned here and their block ids within the local segment."""
        return self.valid & (self.entry_owner == self.grid.j), self.entry_key % self.n_kv_total - self.grid.j * self.n_seg

    def local_lens(self):
        """Valid keys of the local segment's blocks, shared by all heads: [1, n_seg] (None if all)."""
        if self.kv_lens is None:
            return None
        return self.kv_lens[self.grid.j * self.n_seg:(self.grid.j + 1) * self.n_seg].view(1, -1)

    def received_lens(self, keys, bh, slot, n_slots):
        """Valid keys of the blocks in a per-(bh) padded buffer of received keys: [b*n, max(n_slots, 1)]
        (empty slots 0; None if all blocks are whole)."""
        if self.kv_lens is None:
            return None
        lens = self.kv_lens.new_zeros(self.b * self.n, max(n_slots, 1))
        return lens.index_put_((bh, slot), self.kv_lens[keys % self.n_kv_total])

    def layout(self, keys):
        """Received keys (sorted) -> their (bh, slot) in a per-(bh) padded buffer, the slot count,
        and the mask and slot of every selected entry that is one of them."""
        bh = keys // self.n_kv_total
        counts = torch.bincount(bh, minlength=self.b * self.n)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(keys.numel(), device=keys.device) - starts[bh]
        n_slots = int(counts.max()) if keys.numel() else 0
        if keys.numel() == 0:
            return bh, slot, 0, torch.zeros_like(self.valid), torch.zeros_like(self.entry_key)
        pos = torch.searchsorted(keys, self.entry_key).clamp(max=keys.numel() - 1)
        hit = self.valid & (keys[pos] == self.entry_key)
        return bh, slot, n_slots, hit, slot[pos]

    def gather_blocks(self, kvb, like, d, block_kv):
        """One-shot exchange: all requested blocks in one all-to-all. Returns (keys, blocks) sorted by key."""
        sends = {c: self.pack(kvb, c) for c in self.served}
        want = {self.owner_c(jo): self.recv_count(self.owner_c(jo)) * block_kv * 2 * d for jo in self.requests}
        got = block_all_to_all(self.group, sends, want, dtype=like.dtype, device=like.device, name="kv_data")
        keys = torch.cat([self.requests[jo] for jo in sorted(self.requests)])
        blocks = torch.cat([got[self.owner_c(jo)].view(-1, block_kv, 2 * d) for jo in sorted(self.requests)])
        self.gather_order = torch.argsort(keys)
        return keys[self.gather_order], blocks[self.gather_order]

    def return_gradients(self, g_sorted, dkvb, like, d, block_kv):
        """Backward of the one-shot exchange: gradients of received blocks go back to their owners."""
        g = torch.empty_like(g_sorted)
        g[self.gather_order] = g_sorted
        sends, off = {}, 0
        for jo in sorted(self.requests):
            m = self.requests[jo].numel()
            sends[self.owner_c(jo)] = g[off:off + m]
            off += m
        want = {c: self.serve_count(c) * block_kv * 2 * d for c in self.grid.r_peers if c != self.grid.index}
        got = block_all_to_all(self.group, sends, want, dtype=like.dtype, device=like.device, name="kv_grad")
        for c, t in got.items():
            if t.numel():
                self.accumulate(dkvb, c, t.view(-1, block_kv, 2 * d))


def _buffer(recv, bh, slot, n_slots, b, n):
    """Per-(batch, head) padded buffer [b, n, n_slots * block_kv, 2d] of received blocks (differentiable)."""
    m, block_kv, dd = recv.shape
    buf = recv.new_zeros(b * n, max(n_slots, 1), block_kv, dd).index_put((bh, slot), recv)
    return buf.view(b, n, -1, dd)


def _attend(q_bshd, kv_bhsd, part, d, opts):
    k = kv_bhsd[..., :d].transpose(1, 2)
    v = kv_bhsd[..., d:].transpose(1, 2)
    kv_lens = part.kv_lens
    if kv_lens is not None:  # the op takes [n_kv] or [b, heads, n_kv]
        b, n = q_bshd.shape[0], q_bshd.shape[2]
        kv_lens = kv_lens.view(-1) if kv_lens.shape[0] == 1 else kv_lens.view(b, n, -1)
    return block_sparse_attention(q_bshd, k, v, part.kv_idx, part.kv_cnt, layout="bshd", return_lse=True,
                                  kv_lens=kv_lens, **opts)


def _merge(outs, lses):
    """Exact softmax merge of partial results; rows with no keys anywhere give zeros, gradients stay finite."""
    if len(outs) == 1:
        return outs[0]
    if any(o.requires_grad and not l.requires_grad for o, l in zip(outs, lses)):
        # Merged gradients need d(lse): without it the result would be silently wrong.
        raise NotImplementedError("the 'ring' schedule needs a block_sparse_attention backend that propagates "
                                  "gradients through lse; use schedule='gather' with this backend")
    lse = torch.stack(lses)                                   # [t, b, n, s]
    m = lse.amax(0).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(lse - m)                                    # 0 for a round without keys for the row
    tot = e.sum(0)
    w = e / torch.where(tot > 0, tot, torch.ones_like(tot))
    return sum(w[t].transpose(1, 2).unsqueeze(-1).to(o.dtype) * o for t, o in enumerate(outs))


class _SparseKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qh, kh, vh, kv_idx, kv_cnt, group, grid, schedule, opts, kv_lens):
        seg, b, n, d = qh.shape
        block_kv = opts["block_kv"]
        dev = qh.device
        with group.phase("exchange", dev):
            ex = _Exchange(group, grid, kv_idx, kv_cnt, seg_tokens=seg, block_kv=block_kv, kv_lens=kv_lens)
        kv_cat = torch.cat([kh, vh], dim=-1).detach()            # [seg, b, n, 2d]
        kvb = kv_cat.permute(1, 2, 0, 3).unflatten(2, (ex.n_seg, block_kv))  # [b, n, n_seg, block_kv, 2d]
        local_hit, local_slot = ex.local_entries()
        track = any(ctx.needs_input_grad[:3])   # keep a graph for backward only when one is needed
        with torch.set_grad_enabled(track):
            q_leaf = qh.detach().requires_grad_(track)
            kv_leaf = kv_cat.permute(1, 2, 0, 3).requires_grad_(track)     # [b, n, seg, 2d]
            q_bshd = q_leaf.transpose(0, 1)

            def receive(part, blocks):
                part.recv = blocks.view(-1, block_kv, 2 * d).requires_grad_(track)
                return _buffer(part.recv, part.bh, part.slot, part.n_slots, b, n)

            parts, outs, lses = [], [], []
            if schedule == "gather":
                with group.phase("exchange", dev):
                    keys, blocks = ex.gather_blocks(kvb, qh, d, block_kv) if int(ex.matrix.sum()) else (None, None)
                    if keys is None:
                        keys, blocks = local_slot.new_zeros(0), qh.new_zeros(0)
                    bh, slot, n_slots, hit, rslot = ex.layout(keys)
                part = _Part(*_remap(local_hit | hit, torch.where(local_hit, local_slot, ex.n_seg + rslot)),
                             bh=bh, slot=slot, n_slots=n_slots)
                if kv_lens is not None:  # [local segment | received slots], as the buffer
                    received = ex.received_lens(keys, bh, slot, n_slots)
                    part.kv_lens = torch.cat([ex.local_lens().expand(b * n, -1), received], dim=1)
                with group.phase("attention", dev):
                    buf = torch.cat([kv_leaf, receive(part, blocks)], dim=2)
                    o, lse = _attend(q_bshd, buf, part, d, opts)
                parts.append(part)
                outs.append(o)
                lses.append(lse)
            else:
                with group.phase("exchange", dev):
                    pending = _post_round(ex, kvb, 1, qh, d, block_kv)
                with group.phase("attention", dev):
                    local = _Part(*_remap(local_hit, local_slot), kv_lens=ex.local_lens())
                    o, lse = _attend(q_bshd, kv_leaf, local, d, opts)  # overlaps round 1's transfer
                outs.append(o)
                lses.append(lse)
                for t in range(1, grid.R):
                    with group.phase("exchange", dev):
                        blocks = _finish(pending)
                        if t + 1 < grid.R:   # round t+1 in flight while round t is attended
                            pending = _post_round(ex, kvb, t + 1, qh, d, block_kv)
                    with group.phase("attention", dev):
                        keys = ex.requests[(grid.j - t) % grid.R]
                        bh, slot, n_slots, hit, rslot = ex.layout(keys)
                        part = _Part(*_remap(hit, rslot), bh=bh, slot=slot, n_slots=n_slots,
                                     kv_lens=ex.received_lens(keys, bh, slot, n_slots))
                        buf = receive(part, blocks if blocks is not None else qh.new_zeros(0))
                        parts.append(part)
                        if keys.numel():
                            o, lse = _attend(q_bshd, buf, part, d, opts)
                            outs.append(o)
                            lses.append(lse)
            with group.phase("attention", dev):
                out = _merge(outs, lses).transpose(0, 1)                # [seg, b, n, d]
        ctx.state = (ex, parts, q_leaf, kv_leaf, out, schedule, d, block_kv)
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        ex, parts, q_leaf, kv_leaf, out, schedule, d, block_kv = ctx.state
        del ctx.state
        grid = ex.grid
        inputs = [q_leaf, kv_leaf] + [p.recv for p in parts]
        dev = dout.device
        with ex.group.phase("attention_bwd", dev):
            grads = torch.autograd.grad(out, inputs, dout, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
            dq, dkv, drecv = grads[0], grads[1].contiguous(), grads[2:]
        dkvb = dkv.unflatten(2, (ex.n_seg, block_kv))     # view of dkv: owners add returned gradients here
        with ex.group.phase("exchange_bwd", dev):
            if schedule == "gather":
                if int(ex.matrix.sum()):
                    ex.return_gradients(drecv[0], dkvb, dout, d, block_kv)
            else:
                for t in range(1, grid.R):
                    got = _finish(_post_round_back(ex, drecv[t - 1], t, dout, d, block_kv))
                    if got is not None:
                        requester = ex.owner_c((grid.j + t) % grid.R)
                        ex.accumulate(dkvb, requester, got.view(-1, block_kv, 2 * d))
        dkv_sbhd = dkv.permute(2, 0, 1, 3)                # [seg, b, n, 2d]
        return dq, dkv_sbhd[..., :d], dkv_sbhd[..., d:], None, None, None, None, None, None, None




def _post_round(ex: _Exchange, kvb, t, like, d, block_kv):
    """Round t of the ring: serve the rank t after me, receive from the owner t before me."""
    grid, group = ex.grid, ex.group
    to_c = grid.at(grid.u, (grid.j + t) % grid.R)
    from_c = grid.at(grid.u, (grid.j - t) % grid.R)
    send = ex.pack(kvb, to_c).contiguous() if ex.serve_count(to_c) else None
    n_recv = ex.recv_count(from_c)
    return _p2p(group, send, to_c, n_recv * block_kv * 2 * d, from_c, like, t, "kv_data")


def _post_round_back(ex: _Exchange, g_recv, t, like, d, block_kv):
    """Backward round t: gradients of blocks received from the owner t before me go back to it."""
    grid, group = ex.grid, ex.group
    owner_c = grid.at(grid.u, (grid.j - t) % grid.R)
    requester_c = grid.at(grid.u, (grid.j + t) % grid.R)
    send = g_recv.contiguous() if ex.recv_count(owner_c) else None
    n_recv = ex.serve_count(requester_c)
    return _p2p(group, send, owner_c, n_recv * block_kv * 2 * d, requester_c, like, t, "kv_grad")


def _p2p(group, send, to_c, n_recv, from_c, like, tag, name):
    """Paired send/recv, posted together (NCCL needs one group when both go to the same peer);
    an empty side is skipped (both ends know the counts)."""
    ops = []
    if send is not None and send.numel():
        ops.append(dist.P2POp(dist.isend, send, group.ranks[to_c], group.group, tag))
    recv = None
    if n_recv:
        recv = torch.empty(n_recv, dtype=like.dtype, device=like.device)
        ops.append(dist.P2POp(dist.irecv, recv, group.ranks[from_c], group.group, tag))
    works = dist.batch_isend_irecv(ops) if ops else []
    if ops:
        elem = like.element_size()
        group.note(name, elem * (send.numel() if send is not None else 0), elem * n_recv)
    return works, recv, send


def _finish(pending):
    if pending is None:
        return None
    works, recv, _send = pending  # the send buffer must stay alive until its work completes
    for w in works:
        w.wait()
    return recv


def sparse_kv_attention(qh, kh, vh, kv_idx, kv_cnt, group: HybridCPGroup, U: int, *, block_q: int,
                        block_kv: int, scale=None, schedule: str = "gather", backend: str = "auto",
                        kv_lens=None, deterministic: bool = False):
    """Block-sparse attention of this rank's segment queries over globally indexed KV blocks.

    Args:
        qh, kh, vh: [seg, b, n, d] (sbhd): segment j of the sequence for this rank's n heads (the
            output of :func:`seq_to_head`); every rank of the R group holds the same heads.
        kv_idx: [b, n, seg // block_q, k_max] int: GLOBAL KV block ids (block g covers tokens
            [g * block_kv, (g + 1) * block_kv) of the whole sequence), ascending, -1 past kv_cnt.
        kv_cnt: [b, n, seg // block_q] int.
        group, U: the CP group and the head-parallel size (R = P / U).
        schedule: "gather" (one all-to-all) or "ring" (R - 1 overlapped rounds).
        kv_lens: int [n_kv_total]: valid keys at the start of every global KV block (packed clips:
            a clip's last block is partial); the rest are masked wherever the block is attended.
        backend, deterministic: the kernels of each block-sparse call (:func:`block_sparse_attention`).
    Returns out [seg, b, n, d], differentiable in qh, kh, vh (remote dK/dV go back to their owners).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {list(SCHEDULES)}")
    if qh.dim() != 4 or kh.shape != qh.shape or vh.shape != qh.shape:
        raise ValueError(f"qh, kh, vh must share one [seg, b, heads, d] shape, got "
                         f"{tuple(qh.shape)}, {tuple(kh.shape)}, {tuple(vh.shape)}")
    seg = qh.shape[0]
    if seg % block_q or seg % block_kv:
        raise ValueError(f"segment length {seg} must be a multiple of block_q={block_q} and block_kv={block_kv}")
    grid = group.grid(U)
    if kv_lens is not None and tuple(kv_lens.shape) != (seg * grid.R // block_kv,):
        raise ValueError(f"kv_lens must be [{seg * grid.R // block_kv}] (all KV blocks of the sequence), "
                         f"got {tuple(kv_lens.shape)}")
    opts = dict(block_q=block_q, block_kv=block_kv, scale=scale, backend=backend, deterministic=deterministic)
    if grid.R == 1:   # the segment is the whole sequence: every selected block is local, nothing to exchange
        with group.phase("attention", qh.device):
            return block_sparse_attention(qh, kh, vh, kv_idx, kv_cnt, layout="sbhd", kv_lens=kv_lens, **opts)
    return _SparseKVAttention.apply(qh, kh, vh, kv_idx, kv_cnt, group, grid, schedule, opts, kv_lens)
