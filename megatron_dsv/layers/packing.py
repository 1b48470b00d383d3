"""Packed sequences (Megatron's ``packed_seq_params``) as seen by the core attentions.

Megatron passes several sequences packed into one as ``PackedSeqParams``: ``cu_seqlens_q/kv``
(cumulative valid lengths) and optionally ``cu_seqlens_q/kv_padded`` (where each sequence starts
in the tensor, when the packer pads between sequences), with q/k/v either [t, heads, d]
(``qkv_format="thd"``) or [s, 1, heads, d] (``"sbhd"`` with cu_seqlens).

The contract for DSV: every packed sequence is one video clip whose tokens are in cube order
(``megatron_dsv.video.PackedClips`` permutes them and builds the params). The params may carry
``dsv_clips`` (that PackedClips); its clip shapes are then checked against the lengths.

The offsets are read on the host once per cu_seqlens tensor and content version (one device sync
per step when they live on the GPU: all layers share the step's tensors; read_once.py).
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import torch

from ..ops import Segments
from ..ops.segments import check_offsets
from .read_once import ReadOnce

# Segments of (cu_seqlens, cu_seqlens_padded): all layers of a step share one read of the offsets.
_segments = ReadOnce(Segments.from_cu_seqlens)


def packed_segments(packed_seq_params, name: str, cube=None) -> Tuple[Segments, Segments]:
    """(query segments, key/value segments) of the tensors as Megatron passes them. cube: the layer's
    DSVConfig.cube, which the clips' own (``dsv_clips``, where given) must equal."""
    psp = packed_seq_params
    fmt = getattr(psp, "qkv_format", None)
    if fmt not in ("thd", "sbhd"):
        raise NotImplementedError(f"{name} supports packed sequences in qkv_format 'thd' or 'sbhd', got {fmt!r}")
    if psp.cu_seqlens_q is None:
        raise ValueError(f"{name}: packed_seq_params.cu_seqlens_q is required")
    for field in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        if getattr(psp, field, None) is not None:   # tensors, as Megatron's PackedSeqParams holds them
            check_offsets(getattr(psp, field), f"{name}: packed_seq_params.{field}", tensor_only=True)
    q = _segments(psp.cu_seqlens_q, psp.cu_seqlens_q_padded)
    cu_kv = psp.cu_seqlens_kv if psp.cu_seqlens_kv is not None else psp.cu_seqlens_q
    kv_padded = psp.cu_seqlens_kv_padded if psp.cu_seqlens_kv is not None else psp.cu_seqlens_q_padded
    kv = _segments(cu_kv, kv_padded)
    if len(kv) != len(q):
        raise ValueError(f"{name}: cu_seqlens_q has {len(q)} sequences, cu_seqlens_kv {len(kv)}")
    clips = getattr(psp, "dsv_clips", None)
    if clips is not None and tuple(clips.lengths) != q.lengths:
        raise ValueError(f"{name}: packed_seq_params.dsv_clips has clips of {list(clips.lengths)} tokens "
                         f"(grids {list(clips.grids)}) but cu_seqlens_q gives {list(q.lengths)}")
    if clips is not None and cube is not None and tuple(clips.cube) != tuple(cube):
        raise ValueError(f"{name}: packed_seq_params.dsv_clips orders its clips in cubes of {tuple(clips.cube)} but "
                         f"DSVConfig.cube is {tuple(cube)}: the query blocks would not be cubes (PackedClips(cube=...))")
    return q, kv


def as_sbhd(x: torch.Tensor, fmt: str, name: str) -> torch.Tensor:
    """thd [t, h, d] -> [t, 1, h, d] (a view); sbhd must have batch 1 when packed."""
    if fmt == "thd":
        if x.dim() != 3:
            raise ValueError(f"{name}: qkv_format 'thd' needs [t, heads, d] tensors, got {tuple(x.shape)}")
        return x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"{name}: packed 'sbhd' tensors must be [s, 1, heads, d], got {tuple(x.shape)}")
    return x


class BlockAlignedPacking:
    """Moves a packed sequence between Megatron's layout (``src``) and the block-aligned layout
    the DSV kernels need (``dst``: each clip starting at a multiple of `align`, zeros after it).
    When the packer already aligned the clips, both are the same and nothing moves."""

    def __init__(self, src: Segments, align: int):
        self.src = src
        self.identity = all(start % align == 0 for start in src.starts)
        self.dst = src if self.identity else Segments(src.lengths, align=align)

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[src.total, ...] -> [dst.total, ...] with zeros on padding."""
        return x if self.identity else self.dst.scatter(self.src.gather(x))

    def from_blocks(self, y: torch.Tensor) -> torch.Tensor:
        """[dst.total, ...] -> [src.total, ...] with zeros on Megatron's padding."""
        return y if self.identity else self.src.scatter(self.dst.gather(y))


@functools.lru_cache(maxsize=16)
def block_aligned(src: Segments, align: int) -> BlockAlignedPacking:
    """The (cached) packing of `src` into clips aligned to `align` tokens."""
    return BlockAlignedPacking(src, align)


def work_weighted_blocks(segments: Segments, block_kv: int) -> int:
    """The single-sequence KV block count whose quadratic work equals the packing's (for decisions
    made on one number: dense vs sparse dispatch)."""
    return max(1, round(math.sqrt(sum(n * n for n in segments.blocks_per_clip(block_kv)))))
