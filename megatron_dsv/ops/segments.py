"""Segments: several sequences (video clips) packed into one, each at a block-aligned offset.

The block-sparse ops work on whole blocks, so a packed sequence is laid out with every clip
starting at a multiple of the block size and followed by padding up to the next clip:

    clip 0 tokens | pad | clip 1 tokens | pad | ...      starts[i] % max(block_q, block_kv) == 0

With ``segments`` the ops treat each clip as a sequence of its own: a query block may only
select KV blocks of its clip, padding tokens are never attended to, their outputs are zero and
their gradients are zero. Padding must hold finite values (the layer writes zeros), since the
kernels read whole blocks.

The structure is host-side (plain ints): shapes such as the number of selected blocks depend
on the clip lengths. Device tensors derived from it are built once per device and block size.
"""

from __future__ import annotations

from numbers import Integral
from typing import Optional, Sequence, Tuple

import torch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Segments:
    """Clip i holds tokens [starts[i], starts[i] + lengths[i]) of a packed sequence of `total`
    tokens; the rest of [starts[i], starts[i+1]) (and of [starts[-1], total)) is padding.

    Args:
        lengths: valid tokens of each clip (>= 1).
        starts: first token of each clip, increasing, starts[0] == 0 (default: each clip starts at
            the previous clip's end rounded up to `align`).
        total: packed length (default: the last clip's end rounded up to `align`).
        align: block alignment used for the defaults (default 1: no padding).
    """

    def __init__(self, lengths: Sequence[int], starts: Optional[Sequence[int]] = None,
                 total: Optional[int] = None, align: int = 1):
        if not isinstance(align, Integral) or isinstance(align, bool) or align < 1:
            raise ValueError(f"Segments: align must be a positive int, got {align!r}")
        lengths = tuple(int(n) for n in lengths)
        if not lengths or any(n < 1 for n in lengths):
            raise ValueError(f"every clip needs at least one token, got lengths {list(lengths)}")
        if starts is None:
            pos, starts = 0, []
            for n in lengths:
                starts.append(pos)
                pos = _cdiv(pos + n, align) * align
        starts = tuple(int(x) for x in starts)
        if len(starts) != len(lengths):
            raise ValueError(f"{len(starts)} starts for {len(lengths)} clips")
        ends = [s + n for s, n in zip(starts, lengths)]
        if total is None:
            total = _cdiv(ends[-1], align) * align
        if starts[0] != 0 or any(e > s for e, s in zip(ends, starts[1:])) or ends[-1] > total:
            raise ValueError(f"clips overlap or leave the sequence: starts {list(starts)}, lengths "
                             f"{list(lengths)}, total {total}")
        self.lengths, self.starts, self.total = lengths, starts, int(total)
        self._cache: dict = {}

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens, cu_seqlens_padded=None) -> "Segments":
        """From Megatron/TE packed-sequence offsets (host lists or tensors; one sync if on device):
        valid lengths from ``cu_seqlens``, clip starts and total from ``cu_seqlens_padded``. Sequences
        of length 0 (offsets repeated to a fixed count, as for CUDA graphs) hold no clip: what their
        padded span holds is padding."""
        check_offsets(cu_seqlens, "cu_seqlens")
        cu = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else [int(x) for x in cu_seqlens]
        if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {cu}")
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        if cu_seqlens_padded is None:
            return cls._nonempty(lengths, cu[:-1], cu[-1])
        check_offsets(cu_seqlens_padded, "cu_seqlens_padded")
        pad = cu_seqlens_padded.tolist() if torch.is_tensor(cu_seqlens_padded) else [int(x) for x in cu_seqlens_padded]
        if len(pad) != len(cu) or pad[0] != 0 or any(b - a < n for a, b, n in zip(pad, pad[1:], lengths)):
            raise ValueError(f"cu_seqlens_padded {pad} must start at 0 and leave each clip at least "
                             f"its cu_seqlens length {lengths}")
        return cls._nonempty(lengths, pad[:-1], pad[-1])

    @classmethod
    def _nonempty(cls, lengths, starts, total) -> "Segments":
        kept = [(n, s) for n, s in zip(lengths, starts) if n > 0]
        if not kept:
            raise ValueError(f"cu_seqlens describe no tokens (lengths {lengths})")
        if kept[0][1] != 0:
            raise ValueError(f"cu_seqlens_padded: the packing starts with {kept[0][1]} tokens of empty sequences "
                             "(lengths 0); a packing must start with a clip")
        return cls([n for n, _ in kept], starts=[s for _, s in kept], total=total)

    def __len__(self) -> int:
        return len(self.lengths)

    def __repr__(self):
        return f"Segments(lengths={list(self.lengths)}, starts={list(self.starts)}, total={self.total})"

    def __eq__(self, other):
        return isinstance(other, Segments) and (self.lengths, self.starts, self.total) == (
            other.lengths, other.starts, other.total)

    def __hash__(self):
        return hash((self.lengths, self.starts, self.total))

    @property
    def is_padded(self) -> bool:
        return sum(self.lengths) != self.total

    def check(self, seq_len: int, block_q: int, block_kv: int) -> None:
        """The packed tensor has `total` tokens and every clip starts on a block boundary."""
        if seq_len != self.total:
            raise ValueError(f"segments describe {self.total} tokens, the tensors hold {seq_len}")
        align = max(block_q, block_kv)
        if any(s % align for s in self.starts):
            raise ValueError(f"every clip must start at a multiple of max(block_q, block_kv)={align}; "
                             f"starts {list(self.starts)} (pad clips with Segments(..., align={align}))")

    def window(self, lo: int, hi: int) -> Tuple[Tuple[int, int, int, int], ...]:
        """The clips' valid tokens inside tokens [lo, hi) (one context-parallel rank's share):
        (first token, tokens, clip start, clip length) for each clip that has any there."""
        pieces = []
        for start, n in zip(self.starts, self.lengths):
            first, last = max(start, lo), min(start + n, hi)
            if first < last:
                pieces.append((first, last - first, start, n))
        return tuple(pieces)

    # ------------------------------------------------------------------ blocks
    def block_range(self, clip: int, block: int) -> Tuple[int, int]:
        """[first, last) block ids (of size `block`) holding clip `clip`'s valid tokens."""
        first = self.starts[clip] // block
        return first, first + _cdiv(self.lengths[clip], block)

    def blocks_per_clip(self, block: int) -> Tuple[int, ...]:
        return tuple(_cdiv(n, block) for n in self.lengths)

    def _device(self, name, device, build):
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = build().to(device)
        return self._cache[key]

    def token_valid(self, device) -> torch.Tensor:
        """bool [total]: True on clip tokens, False on padding."""
        def build():
            valid = torch.zeros(self.total, dtype=torch.bool)
            for s, n in zip(self.starts, self.lengths):
                valid[s:s + n] = True
            return valid
        return self._device("valid", device, build)

    def token_index(self, device) -> torch.Tensor:
        """int64 [sum(lengths)]: positions of the clip tokens, clip after clip."""
        return self._device("index", device, lambda: self.token_valid("cpu").nonzero().squeeze(1))

    def scatter(self, x: torch.Tensor, dim: int = 0, fill: float = 0.0) -> torch.Tensor:
        """The clips' tokens concatenated along `dim` ([sum(lengths)]) -> the packed layout
        ([total]), `fill` on padding. Differentiable in x."""
        shape = list(x.shape)
        shape[dim] = self.total
        return x.new_full(shape, fill).index_copy(dim, self.token_index(x.device), x)

    def gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The packed layout -> the clips' tokens concatenated along `dim` (padding dropped)."""
        return x.index_select(dim, self.token_index(x.device))

    def block_lens(self, block: int, device) -> torch.Tensor:
        """int32 [ceil(total / block)]: valid tokens in each block (0 for pure padding)."""
        def build():
            padded = torch.zeros(_cdiv(self.total, block) * block, dtype=torch.int32)
            padded[:self.total] = self.token_valid("cpu").int()
            return padded.view(-1, block).sum(1, dtype=torch.int32)
        return self._device(("lens", block), device, build)

    def block_clip(self, block: int) -> torch.Tensor:
        """int64 [ceil(total / block)] on the CPU: clip of each block, -1 for blocks of pure padding."""
        def build():
            clip = torch.full((_cdiv(self.total, block),), -1, dtype=torch.int64)
            for c in range(len(self)):
                lo, hi = self.block_range(c, block)
                clip[lo:hi] = c
            return clip
        return self._device(("clip", block), "cpu", build)

    def kv_token_range(self, block_q: int, device) -> torch.Tensor:
        """int32 [n_qblocks, 2]: [first, last) token of the keys each query block may attend to
        (its clip's valid tokens; an empty range for query blocks of pure padding)."""
        def build():
            clip = self.block_clip(block_q)
            starts = torch.tensor(self.starts + (0,), dtype=torch.int64)[clip]
            ends = starts + torch.tensor(self.lengths + (0,), dtype=torch.int64)[clip]
            return torch.stack([starts, ends], 1).int()
        return self._device(("kv_range", block_q), device, build)


def check_offsets(x, name: str, tensor_only: bool = False) -> None:
    """Packed-sequence offsets: a 1-D int tensor or (unless tensor_only) a sequence of ints. Reads no
    device values."""
    if torch.is_tensor(x):
        if x.dim() != 1 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D int tensor, got a {x.dtype} tensor of shape {tuple(x.shape)}")
    elif tensor_only or not isinstance(x, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, Integral)
                                                                for v in x):
        raise ValueError(f"{name} must be a 1-D int tensor{'' if tensor_only else ' or a list of ints'}, got "
                         f"{x!r:.80}")


def check_segments(segments, seq_len: int, block_q: int, block_kv: int) -> None:
    """The `segments` argument of the ops: a Segments (Segments.check: `seq_len` tokens, clips on block
    boundaries)."""
    if not isinstance(segments, Segments):
        raise ValueError(f"segments must be a megatron_dsv.ops.Segments (Segments.from_cu_seqlens), got "
                         f"{type(segments).__name__}")
    segments.check(seq_len, block_q, block_kv)
