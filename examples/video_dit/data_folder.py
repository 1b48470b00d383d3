"""Clips from a folder of the user's own video files, cut to the model's latent shape (PyAV).

Every file under ``root`` with a video extension is a source. Item i takes file
i mod n_files and a start frame drawn from (seed, i); it decodes T frames, every
``frame_stride``-th, centre-crops them to the latent's aspect ratio and area-resizes
them to H x W. Like the other built-in datasets there is no VAE: the clip stays in
pixel space at latent resolution, RGB mapped to C channels by the fixed map of
data_images.channel_map. Files shorter than T * frame_stride frames are skipped, with
an error if none is long enough. Caption id: file index mod num_captions.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .data_images import channel_map

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError("reading video files needs PyAV: pip install av") from e
    return av


def count_frames(path: Path) -> int:
    av = _av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))  # containers without a frame count


def read_frames(path: Path, start: int, count: int, stride: int) -> torch.Tensor:
    """Frames start, start+stride, ... (count of them) as [count, 3, h, w] float in [0, 1]."""
    av = _av()
    wanted = set(range(start, start + count * stride, stride))
    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in wanted:
                frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if len(frames) == count:
                break
    if len(frames) != count:
        raise ValueError(f"{path}: got {len(frames)} of {count} frames from frame {start}")
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 255.0


def fit(frames: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Centre-crop [T, 3, h, w] to the aspect ratio of size (H, W), then area-resize to it."""
    H, W = size
    h, w = frames.shape[2:]
    if h * W > w * H:  # too tall
        ch = round(w * H / W)
        frames = frames[:, :, (h - ch) // 2:(h - ch) // 2 + ch]
    else:
        cw = round(h * W / H)
        frames = frames[:, :, :, (w - cw) // 2:(w - cw) // 2 + cw]
    mode = "area" if frames.shape[2] >= H else "bilinear"
    return F.interpolate(frames, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))


class VideoFolder(torch.utils.data.Dataset):
    def __init__(self, root, channels: int, shape: Tuple[int, int, int], seed: int = 0, frame_stride: int = 1,
                 num_captions: int = 16, length: int = 1 << 30):
        self.channels, self.shape, self.seed, self.stride = channels, tuple(shape), seed, frame_stride
        self.num_captions, self.length = num_captions, length
        files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
        if not files:
            raise ValueError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {root}")
        need = (shape[0] - 1) * frame_stride + 1
        self.files: List[Tuple[Path, int]] = [(p, n) for p in files if (n := count_frames(p)) >= need]
        if not self.files:
            raise ValueError(f"no video under {root} has the {need} frames a clip of {shape[0]} frames at "
                             f"stride {frame_stride} needs")

    def __len__(self):
        return self.length

    def __getitem__(self, index: int):
        path, n = self.files[index % len(self.files)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        span = (self.shape[0] - 1) * self.stride + 1
        start = int(torch.randint(0, n - span + 1, (1,), generator=g))
        frames = fit(read_frames(path, start, self.shape[0], self.stride), self.shape[1:])  # [T, 3, H, W]
        video = torch.einsum("cr,trhw->cthw", channel_map(self.channels), (frames - 0.45) / 0.25)
        return video.contiguous(), (index % len(self.files)) % self.num_captions

    def batch(self, start: int, size: int):
        items = [self[start + i] for i in range(size)]
        return torch.stack([v for v, _ in items]), torch.tensor([c for _, c in items], dtype=torch.int64)
