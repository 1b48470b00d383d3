"""One video's tokens split over context-parallel ranks the way DSV's hybrid CP needs them.

Megatron's THD partitioning (what WAN's data step uses) gives each CP rank two zigzag chunks of
the raster-order sequence, to balance causal attention. DSV's hybrid context parallelism needs
something else: rank c holds the contiguous tokens [c * s_local, (c + 1) * s_local) of the
cube-ordered sequence, a whole number of query and KV blocks. Bidirectional attention needs no
zigzag balance. A grid whose token count is not a multiple of P x block is zero-padded at the
end. The padding is described to the attention by :meth:`CPShard.packed_seq_params` (one clip,
padded), so no query attends to it, and it carries no loss (:meth:`shard` pads a loss mask with
zeros).
"""

from __future__ import annotations

from numbers import Integral
from typing import Sequence

import torch

from .packing import PackedClips


class CPShard:
    """Rank ``cp_rank`` of ``cp_size``'s share of one video of latent grid ``grid`` (T, H, W).

    The video is put in cube order (``cube``, DSVConfig.cube) and padded to a multiple of
    ``cp_size * align`` tokens (align: max(block_q, block_kv)); each rank holds an equal,
    contiguous share of that.
    """

    def __init__(self, grid: Sequence[int], cube: Sequence[int], cp_size: int, cp_rank: int, align: int):
        if any(not isinstance(v, Integral) or isinstance(v, bool) for v in (cp_size, cp_rank, align)):
            raise ValueError(f"cp_size, cp_rank and align must be ints, got {cp_size!r}, {cp_rank!r}, {align!r}")
        if cp_size < 1 or not 0 <= cp_rank < cp_size or align < 1:
            raise ValueError(f"need cp_size >= 1, 0 <= cp_rank < cp_size and align >= 1; got {cp_size}, {cp_rank}, "
                             f"{align}")
        self.clips = PackedClips([grid], cube, align=cp_size * align)
        self.grid, self.cube = self.clips.grids[0], self.clips.cube
        self.num_tokens = self.clips.lengths[0]
        self.total = self.clips.total
        self.cp_size, self.cp_rank = cp_size, cp_rank
        self.s_local = self.total // cp_size

    def __repr__(self):
        return (f"CPShard(grid={self.grid}, cube={self.cube}, tokens={self.num_tokens}, padded={self.total}, "
                f"rank {self.cp_rank} of {self.cp_size})")

    def shard(self, x: torch.Tensor, seq_dim: int = 0) -> torch.Tensor:
        """Raster-order tokens of the whole video (the first num_tokens along ``seq_dim``; trailing padding is
        ignored) -> this rank's share [s_local, ...] of the cube-ordered, zero-padded sequence."""
        if not -x.dim() <= seq_dim < x.dim():
            raise ValueError(f"seq_dim={seq_dim} is not a dimension of a {x.dim()}-d tensor {tuple(x.shape)}")
        if x.shape[seq_dim] < self.num_tokens:
            raise ValueError(f"expected at least {self.num_tokens} tokens (grid {self.grid}) on dim {seq_dim}, "
                             f"got {tuple(x.shape)}")
        whole = self.clips.pack([x.narrow(seq_dim, 0, self.num_tokens)], seq_dim)
        return whole.narrow(seq_dim, self.cp_rank * self.s_local, self.s_local)

    def packed_seq_params(self, device=None):
        """Megatron ``PackedSeqParams`` ("sbhd") of the whole padded sequence when there is padding, else None
        (the attention then takes the shards as plain sequences)."""
        if self.total == self.num_tokens:
            return None
        return self.clips.packed_seq_params(device=device, qkv_format="sbhd")
