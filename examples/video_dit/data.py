"""Procedural latent-shaped videos: moving shapes, deterministic per (seed, index).

Each clip [C, T, H, W] is a smooth colour gradient background with one to three shapes
(disc, square, ring or bar) that move with constant velocity and bounce off the
borders. A shape's "colour" is a C-dim vector, as a VAE latent would carry. The caption
id of a clip names the first shape's kind and its main direction of motion
(kind * 4 + direction), so text cross-attention has something to learn.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

KINDS = ("disc", "square", "ring", "bar")
NUM_CAPTIONS = len(KINDS) * 4


def _shape_mask(kind: int, yy, xx, cy, cx, r):
    dy, dx = yy - cy, xx - cx
    if kind == 0:
        return (dy ** 2 + dx ** 2 <= r ** 2).float()
    if kind == 1:
        return ((dy.abs() <= r) & (dx.abs() <= r)).float()
    if kind == 2:
        d2 = dy ** 2 + dx ** 2
        return ((d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)).float()
    return ((dy.abs() <= 0.35 * r) & (dx.abs() <= 1.6 * r)).float()


def moving_shapes_clip(seed: int, index: int, channels: int, shape: Tuple[int, int, int]):
    """One clip [C, T, H, W] float32 (values mostly within [-3, 3], standard deviation near 1) and its caption id."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    T, H, W = shape
    yy = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    xx = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    tt = torch.arange(T, dtype=torch.float32).view(T, 1, 1)
    # Background: a gentle gradient per channel.
    a = (torch.rand(channels, 3, generator=g) - 0.5) * 2.0
    video = (a[:, 0].view(-1, 1, 1, 1) + a[:, 1].view(-1, 1, 1, 1) * (yy / H - 0.5).unsqueeze(0)
             + a[:, 2].view(-1, 1, 1, 1) * (xx / W - 0.5).unsqueeze(0)).expand(channels, T, H, W).clone()
    n_shapes = int(torch.randint(1, 4, (1,), generator=g))
    caption = 0
    for i in range(n_shapes):
        kind = int(torch.randint(0, len(KINDS), (1,), generator=g))
        r = float(min(H, W)) * (0.08 + 0.12 * float(torch.rand(1, generator=g)))
        cy0, cx0 = (float(torch.rand(1, generator=g)) * (H - 2 * r) + r,
                    float(torch.rand(1, generator=g)) * (W - 2 * r) + r)
        angle = float(torch.rand(1, generator=g)) * 2 * math.pi
        speed = min(H, W) * (0.02 + 0.05 * float(torch.rand(1, generator=g)))
        vy, vx = speed * math.sin(angle), speed * math.cos(angle)
        # Bounce: reflect the unbounded trajectory into [r, size - r].
        cy = _reflect(cy0 + vy * tt, r, H - r)
        cx = _reflect(cx0 + vx * tt, r, W - r)
        mask = _shape_mask(kind, yy, xx, cy, cx, r)  # [T, H, W]
        colour = torch.randn(channels, generator=g) * 1.5
        video = video * (1 - mask) + colour.view(-1, 1, 1, 1) * mask
        if i == 0:
            direction = int(((angle + math.pi / 4) % (2 * math.pi)) // (math.pi / 2))  # E, N, W, S
            caption = kind * 4 + direction
    return video, caption


def _reflect(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    span = hi - lo
    if span <= 0:
        return torch.full_like(x, (lo + hi) / 2)
    y = torch.remainder(x - lo, 2 * span)
    return lo + torch.where(y > span, 2 * span - y, y)


class MovingShapes(torch.utils.data.Dataset):
    """Infinite-style dataset of moving-shape clips; item i is the same for the same seed."""

    def __init__(self, channels: int, shape: Tuple[int, int, int], seed: int = 0, length: int = 1 << 30):
        self.channels, self.shape, self.seed, self.length = channels, tuple(shape), seed, length

    def __len__(self):
        return self.length

    def __getitem__(self, index: int):
        video, caption = moving_shapes_clip(self.seed, index, self.channels, self.shape)
        return video, caption

    def batch(self, start: int, size: int):
        """Items start .. start+size-1 stacked: (videos [b, C, T, H, W], captions [b] int64)."""
        items = [self[start + i] for i in range(size)]
        return torch.stack([v for v, _ in items]), torch.tensor([c for _, c in items], dtype=torch.int64)
