"""Tensor layouts of the attention ops. Conversions are views (no copies)."""

import torch

LAYOUTS = ("bshd", "sbhd")


def to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a bshd or sbhd tensor as [b, h, s, d]."""
    return x.transpose(1, 2) if layout == "bshd" else x.permute(1, 2, 0, 3)


def from_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a [b, h, s, d] tensor in the given layout."""
    return x.transpose(1, 2) if layout == "bshd" else x.permute(2, 0, 1, 3)


def seq_dim(layout: str) -> int:
    """The sequence dimension of a bshd or sbhd tensor."""
    return 1 if layout == "bshd" else 0


def split_dims(x: torch.Tensor, layout: str):
    """(batch, seq, heads, head_dim) sizes of a tensor in the given layout."""
    if layout == "bshd":
        b, s, h, d = x.shape
    else:
        s, b, h, d = x.shape
    return b, s, h, d
