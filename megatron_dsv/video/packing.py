"""Several video clips of different latent shapes packed into one sequence (Megatron's THD format).

DSV needs each clip in cube order (its own :class:`CubeLayout`) and, for its kernels, each clip
starting on a block boundary. ``PackedClips`` does both on the model side and builds the
``PackedSeqParams`` that Megatron's attention passes to ``core_attention``:

    clips = PackedClips([(8, 16, 16), (4, 12, 20)], cube=cfg.cube, align=max(cfg.block_q, cfg.block_kv))
    tokens = clips.pack([patchify(video_a), patchify(video_b)])   # [total, hidden], raster -> cube order
    params = clips.packed_seq_params(device)                      # qkv_format "thd", cu_seqlens(_padded)
    ...
    outs = clips.unpack(model_output)                              # one raster-order tensor per clip

With ``align`` the clips already sit where the kernels want them, so the attention layer moves no
data; without it (align=1) the layer aligns them itself, at the cost of a copy per call.
The params carry this object as ``dsv_clips``: the layer checks the clip shapes against cu_seqlens.
"""

from __future__ import annotations

from numbers import Integral
from typing import List, Sequence

import torch

from ..ops import Segments
from .layout import CubeLayout, raster_positions


class PackedClips:
    """Clips of latent grids `grids` [(T, H, W), ...], each in cube order, packed one after another,
    each starting at a multiple of `align` tokens (zeros in between)."""

    def __init__(self, grids: Sequence[Sequence[int]], cube: Sequence[int], align: int = 1):
        if not grids:
            raise ValueError("PackedClips needs at least one clip")
        if all(isinstance(g, Integral) for g in grids):   # one (T, H, W) where a list of them belongs
            raise TypeError(f"PackedClips takes a list of (T, H, W) grids, got {tuple(grids)}: for one clip "
                            f"pass [{tuple(grids)}]")
        self.layouts = [CubeLayout(g, cube) for g in grids]
        self.grids = [layout.grid for layout in self.layouts]
        self.cube = self.layouts[0].cube
        self.lengths = [layout.num_tokens for layout in self.layouts]
        self.segments = Segments(self.lengths, align=align)

    def __repr__(self):
        return f"PackedClips(grids={self.grids}, cube={self.cube}, segments={self.segments})"

    @property
    def total(self) -> int:
        return self.segments.total

    def valid(self, device=None) -> torch.Tensor:
        """bool [total]: True on clip tokens, False on the alignment padding (e.g. to mask a loss)."""
        return self.segments.token_valid("cpu" if device is None else device)

    def pack(self, clips: Sequence[torch.Tensor], seq_dim: int = 0) -> torch.Tensor:
        """Raster-order clips (token dim `seq_dim`) -> one packed tensor, each clip in cube order."""
        if len(clips) != len(self.layouts):
            raise ValueError(f"expected {len(self.layouts)} clips, got {len(clips)}")
        cube_order = [layout.to_cube(x, seq_dim) for x, layout in zip(clips, self.layouts)]
        return self.segments.scatter(torch.cat(cube_order, dim=seq_dim), seq_dim)

    def unpack(self, x: torch.Tensor, seq_dim: int = 0) -> List[torch.Tensor]:
        """The packed tensor -> one raster-order tensor per clip (padding dropped)."""
        if x.shape[seq_dim] != self.total:
            raise ValueError(f"expected {self.total} packed tokens on dim {seq_dim}, got {tuple(x.shape)}")
        return [layout.from_cube(x.narrow(seq_dim, start, layout.num_tokens), seq_dim)
                for layout, start in zip(self.layouts, self.segments.starts)]

    def positions(self, device=None) -> torch.Tensor:
        """[total, 3] int64 (t, h, w) latent coordinates of every packed token (0 on padding), for 3D RoPE."""
        return self.pack([raster_positions(grid) for grid in self.grids]).to(device or "cpu")

    def packed_seq_params(self, device=None, qkv_format: str = "thd"):
        """Megatron ``PackedSeqParams`` of this packing, carrying ``dsv_clips``. qkv_format "thd" feeds
        q/k/v as [t, heads, d]; "sbhd" keeps [t, 1, heads, d] (Megatron then applies rotary angles
        per token, as 3D RoPE over packed clips needs; its THD RoPE restarts 1D positions per clip)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        def cumulative(values):
            out = torch.zeros(len(values) + 1, dtype=torch.int32)
            out[1:] = torch.tensor(values, dtype=torch.int32).cumsum(0)
            return out.to(device or "cpu")

        seg = self.segments
        cu = cumulative(self.lengths)
        padded = cumulative([b - a for a, b in zip(seg.starts, seg.starts[1:] + (seg.total,))])
        params = PackedSeqParams(qkv_format=qkv_format, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 cu_seqlens_q_padded=padded if seg.is_padded else None,
                                 cu_seqlens_kv_padded=padded if seg.is_padded else None,
                                 max_seqlen_q=max(self.lengths), max_seqlen_kv=max(self.lengths))
        params.dsv_clips = self
        return params
