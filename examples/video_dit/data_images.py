"""Videos with natural-image content: camera pans and zooms over photographs, plus moving sprites.

The photographs are the sample images that ship inside scikit-image (``skimage.data``:
astronaut, coffee, chelsea, rocket, hubble_deep_field, ...), so nothing is downloaded.
Every clip is deterministic per (seed, index):

- a camera path over one photograph: a pan (constant velocity, one of four directions)
  or a zoom (in or out), rendered with bilinear sampling from a pre-shrunk copy of the
  image (area filter, so the small output is not aliased);
- with probability 1/2, one to three round "sprites" cut from other photographs that
  move in straight lines and bounce off the borders.

There is no VAE here: the clip is in pixel space at the latent resolution, and the 3
colour channels are mapped to the model's C latent channels by a fixed linear map
(identity on the first three channels, fixed seeded mixes of RGB beyond; for C < 3
the first C of [luma, two chroma differences]). Values are normalised to roughly unit
standard deviation. Caption id = camera motion (0-3 pan E/N/W/S, 4 zoom in, 5 zoom out)
+ 6 if sprites are present (12 captions).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Tuple

import torch
import torch.nn.functional as F

from .data import _reflect

RGB_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
              "retina", "colorwheel", "stereo_motorcycle")
GRAY_IMAGES = ("camera", "brick", "grass", "gravel", "moon", "coins", "clock")
NUM_CAPTIONS = 12


def _skimage_data():
    try:
        import skimage.data
    except ImportError as e:  # an optional dependency of the example only
        raise ImportError("the 'images' dataset needs scikit-image: pip install scikit-image") from e
    return skimage.data


@lru_cache(maxsize=None)
def _photo(name: str) -> torch.Tensor:
    """[3, H, W] float32 in [0, 1]."""
    img = getattr(_skimage_data(), name)()
    if isinstance(img, tuple):  # stereo pairs
        img = img[0]
    t = torch.from_numpy(img.copy()).float() / 255.0
    t = t.unsqueeze(0).expand(3, -1, -1) if t.dim() == 2 else t[..., :3].permute(2, 0, 1)
    return t.contiguous()


@lru_cache(maxsize=None)
def _shrunk(name: str, min_side: int) -> torch.Tensor:
    """The photo area-resized so its short side is min_side pixels: [1, 3, h, w]."""
    img = _photo(name)
    scale = min_side / min(img.shape[1:])
    if scale >= 1:
        return img.unsqueeze(0)
    size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[2] * scale)))
    return F.interpolate(img.unsqueeze(0), size=size, mode="area")


def channel_map(channels: int) -> torch.Tensor:
    """Fixed [C, 3] map from normalised RGB to C latent channels (see the module docstring)."""
    if channels < 3:
        yuv = torch.tensor([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]])
        return yuv[:channels] / yuv[:channels].norm(dim=1, keepdim=True)
    extra = torch.randn(channels - 3, 3, generator=torch.Generator().manual_seed(77))
    return torch.cat([torch.eye(3), extra / extra.norm(dim=1, keepdim=True)])


def _render_camera(img: torch.Tensor, centres: torch.Tensor, heights: torch.Tensor, out_hw) -> torch.Tensor:
    """Frames [T, 3, H, W]: crops of img [1, 3, h, w] with centres [T, 2] (x, y in [-1, 1]) and
    crop heights [T] (fraction of the image height); the crop has the output's aspect ratio."""
    H, W = out_hw
    ih, iw = img.shape[2:]
    sy = heights
    sx = heights * (W / H) * (ih / iw)
    theta = torch.zeros(len(heights), 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, centres[:, 0]
    theta[:, 1, 1], theta[:, 1, 2] = sy, centres[:, 1]
    grid = F.affine_grid(theta, [len(heights), 3, H, W], align_corners=False)
    return F.grid_sample(img.expand(len(heights), -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def camera_clip(seed: int, index: int, channels: int, shape: Tuple[int, int, int]):
    """One clip [C, T, H, W] float32 and its caption id."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    T, H, W = shape
    names = RGB_IMAGES + GRAY_IMAGES

    def rand():
        return float(torch.rand(1, generator=g))

    img = _shrunk(names[int(torch.randint(len(names), (1,), generator=g))], 3 * max(H, W))
    ih, iw = img.shape[2:]
    max_h = min(1.0, (iw / ih) * (H / W))  # largest crop height (fraction) that fits the width
    motion = int(torch.randint(6, (1,), generator=g))
    s = torch.linspace(0, 1, T)
    if motion < 4:  # pan: fixed zoom, the centre travels in one of four directions
        h = max_h * (0.45 + 0.35 * rand())
        hx = h * (W / H) * (ih / iw)
        span_x, span_y = 1 - hx, 1 - h  # the centre may move within [-span, span]
        direction = [(1, 0), (0, -1), (-1, 0), (0, 1)][motion]  # E, N (up), W, S
        travel = 0.5 + 0.5 * rand()
        cx = torch.full((T,), (2 * rand() - 1) * span_x)
        cy = torch.full((T,), (2 * rand() - 1) * span_y)
        if direction[0]:
            cx = direction[0] * span_x * travel * (2 * s - 1)
        else:
            cy = -direction[1] * span_y * travel * (2 * s - 1)
        heights = torch.full((T,), h)
    else:  # zoom in (4) or out (5) around a fixed point
        h_far, h_near = max_h * (0.8 + 0.2 * rand()), max_h * (0.3 + 0.15 * rand())
        heights = h_far + (h_near - h_far) * s if motion == 4 else h_near + (h_far - h_near) * s
        hx = heights * (W / H) * (ih / iw)
        px, py = 2 * rand() - 1, 2 * rand() - 1  # zoom target, as a fraction of the free span
        cx, cy = px * (1 - hx), py * (1 - heights)
    frames = _render_camera(img, torch.stack([cx, cy], dim=1), heights, (H, W))  # [T, 3, H, W]

    sprites = rand() < 0.5
    if sprites:
        yy = torch.arange(H, dtype=torch.float32).view(1, H, 1)
        xx = torch.arange(W, dtype=torch.float32).view(1, 1, W)
        tt = torch.arange(T, dtype=torch.float32).view(T, 1, 1)
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            r = min(H, W) * (0.12 + 0.1 * rand())
            src = _shrunk(names[int(torch.randint(len(names), (1,), generator=g))], 3 * max(H, W))
            # The sprite's texture: a small crop of another photo, fixed in the sprite's frame.
            side = (0.3 + 0.4 * rand()) * min(1.0, (src.shape[3] / src.shape[2]) * (H / W))
            side_x = side * (W / H) * (src.shape[2] / src.shape[3])
            centre = torch.tensor([[(2 * rand() - 1) * (1 - side_x), (2 * rand() - 1) * (1 - side)]])
            tex = _render_camera(src, centre, torch.tensor([side]), (H, W))[0]  # [3, H, W]
            angle, speed = 2 * math.pi * rand(), min(H, W) * (0.03 + 0.05 * rand())
            cy = _reflect(r + rand() * (H - 2 * r) + speed * math.sin(angle) * tt, r, H - r)
            cx = _reflect(r + rand() * (W - 2 * r) + speed * math.cos(angle) * tt, r, W - r)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2).float().unsqueeze(1)  # [T, 1, H, W]
            # Shift the texture with the sprite: sample it at (y - cy + H/2, x - cx + W/2).
            theta = torch.zeros(T, 2, 3)
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0
            theta[:, 0, 2] = -(cx.view(T) - W / 2) * 2 / W
            theta[:, 1, 2] = -(cy.view(T) - H / 2) * 2 / H
            grid = F.affine_grid(theta, [T, 3, H, W], align_corners=False)
            moved = F.grid_sample(tex.unsqueeze(0).expand(T, -1, -1, -1), grid, mode="bilinear",
                                  padding_mode="border", align_corners=False)
            frames = frames * (1 - mask) + moved * mask
    rgb = (frames - 0.45) / 0.25  # [T, 3, H, W], roughly unit variance
    video = torch.einsum("cr,trhw->cthw", channel_map(channels), rgb)
    return video.contiguous(), motion + (6 if sprites else 0)


class CameraOverImages(torch.utils.data.Dataset):
    """Camera pans/zooms over scikit-image's sample photographs with moving sprites."""

    def __init__(self, channels: int, shape: Tuple[int, int, int], seed: int = 0, length: int = 1 << 30):
        _skimage_data()  # fail early with a clear message when scikit-image is missing
        self.channels, self.shape, self.seed, self.length = channels, tuple(shape), seed, length

    def __len__(self):
        return self.length

    def __getitem__(self, index: int):
        return camera_clip(self.seed, index, self.channels, self.shape)

    def batch(self, start: int, size: int):
        items = [self[start + i] for i in range(size)]
        return torch.stack([v for v, _ in items]), torch.tensor([c for _, c in items], dtype=torch.int64)
