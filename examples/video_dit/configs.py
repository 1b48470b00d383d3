"""Model size presets of the example video DiT.

The latent is what a video VAE would produce: [C, T, H, W] channels x frames x rows x
columns. This example has no VAE: it trains directly on latent-shaped tensors (the
built-in datasets generate them), and patchifies them into tokens of
patch = (pt, ph, pw) latent cells. Tokens = (T/pt) * (H/ph) * (W/pw).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class DiTConfig:
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_mult: int = 4
    latent_channels: int = 4
    latent_shape: Tuple[int, int, int] = (8, 32, 32)
    """Latent frames, rows, columns (T, H, W)."""
    patch: Tuple[int, int, int] = (1, 2, 2)
    text_len: int = 8
    """Tokens per caption for cross-attention (0: no cross-attention)."""
    text_dim: int = 64
    """Width of the fixed caption embeddings (projected to hidden_size by the model)."""
    num_captions: int = 16
    rope_theta: float = 10000.0
    qk_norm: bool = True
    """RMSNorm on queries and keys per head (as in WAN and other video DiTs)."""
    qk_norm_init: float = 1.0
    """Initial gain of the q/k RMSNorms; the attention logit scale starts at qk_norm_init**2
    (like the learnable logit scale of cosine attention). >1 gives peaked attention from the start."""
    qk_tied_init: bool = False
    """Start every head with W_k = W_q, so a token's attention favours tokens of similar content and,
    through 3D RoPE, nearby positions: the local, content-driven pattern trained video DiTs show."""

    def __post_init__(self):
        sizes = dict(num_layers=self.num_layers, hidden_size=self.hidden_size, num_heads=self.num_heads,
                     latent_channels=self.latent_channels, **{f"latent {n}": v for n, v in zip("THW", self.latent_shape)},
                     **{f"patch {n}": v for n, v in zip("THW", self.patch)})
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.text_len < 0:
            raise ValueError(f"text_len must be at least 0, got {self.text_len}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head dim {self.head_dim} must be even and >= 6 for 3D RoPE")
        for n, p, name in zip(self.latent_shape, self.patch, "THW"):
            if n % p:
                raise ValueError(f"latent {name}={n} is not divisible by patch {p}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> Tuple[int, int, int]:
        """Token grid after patchify."""
        return tuple(n // p for n, p in zip(self.latent_shape, self.patch))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * math.prod(self.patch)

    def replace(self, **changes) -> "DiTConfig":
        return dataclasses.replace(self, **changes)


PRESETS = {
    # CPU: 2048 tokens, runs the DSV main job in under a minute on two cores.
    "tiny": DiTConfig(num_layers=2, hidden_size=128, num_heads=4, latent_shape=(8, 32, 32), qk_norm_init=2.5,
                    qk_tied_init=True),
    # One GPU, a few minutes: quality comparisons dense vs DSV (16k tokens).
    # Tied q/k init and a 1.5 logit gain so attention is structured from the start:
    # a few GPU minutes cannot grow the sparsity a pretrained DiT has.
    "small": DiTConfig(num_layers=8, hidden_size=512, num_heads=8, latent_shape=(16, 64, 64),
                       text_dim=256, qk_norm_init=1.5, qk_tied_init=True),
    # The DSV paper's model shapes (arXiv 2502.07590): 28 layers x 12 heads x 96 and
    # 32 layers x 16 heads x 128; latent sizes are defaults, override with --latent-shape.
    "dsv-0.8b": DiTConfig(num_layers=28, hidden_size=1152, num_heads=12, latent_channels=16,
                          latent_shape=(16, 64, 64), text_dim=1024, text_len=32),
    "dsv-2.7b": DiTConfig(num_layers=32, hidden_size=2048, num_heads=16, latent_channels=16,
                          latent_shape=(16, 64, 64), text_dim=1024, text_len=32),
}
