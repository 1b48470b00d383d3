"""Cube-major token order for video latents.

DSV selects critical keys once per query block, and a query block is one 3D cube of
latent tokens (e.g. 4x4x4): neighbouring queries in a cube share most of their
critical keys. Patch embedding produces tokens in raster order (t, h, w); this module
permutes them once into cube-major order and back, and gives each token its (t, h, w)
coordinates in that order for 3D RoPE.

Rule for grids not divisible by the cube
----------------------------------------
The grid (T, H, W) is tiled by cubes (ct, ch, cw) from the origin; cubes on the far
edge of a dimension that does not divide are smaller ("partial"). The order is:

1. every full cube first, cubes in raster order of their cube coordinates, tokens
   inside a cube in raster order;
2. then the partial cubes, grouped by which dimensions are cut (cut w only, then h
   only, then h and w, then t only, ...; i.e. by the bit mask t*4 + h*2 + w), within a
   group in raster order of cube coordinates; each partial cube stays contiguous.

Why: with block_q = ct*ch*cw (DSVConfig enforces it) every full cube is then exactly
one query block, aligned to a multiple of block_q, so selection for the interior of
the video is exactly per-cube. Partial cubes of one group all have the same size and
are spatial neighbours, so when that size divides block_q (the common case, e.g. a
1x4x4 slab piece in a 4x4x4 cube) a query block holds several whole neighbouring
pieces and no piece straddles two blocks. Otherwise a piece can straddle two query
blocks; that only makes the block's proxy query a mean over two adjacent edge pieces
(attention itself stays exact over the selected blocks), and it concerns only the
edge slab, a small share of the tokens. The last query block may be short when the
token count is not a multiple of block_q; the ops accept that.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence, Tuple

import torch

__all__ = ["CubeLayout", "cube_permutation", "raster_positions"]


def _check_triple(name: str, value: Sequence[int]) -> Tuple[int, int, int]:
    vals = tuple(int(v) for v in value)
    if len(vals) != 3 or any(v < 1 for v in vals) or any(int(v) != v for v in value):
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {tuple(value)}")
    return vals


def raster_positions(grid: Sequence[int]) -> torch.Tensor:
    """[T*H*W, 3] int64 (t, h, w) coordinates of the tokens in raster order."""
    T, H, W = _check_triple("grid", grid)
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)


def cube_permutation(grid: Sequence[int], cube: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(perm, inv), both int64 [T*H*W] on the CPU.

    ``perm[i]`` is the raster index of the token at cube-order position i, so
    ``x_cube = x_raster[perm]``; ``inv[j]`` is the cube-order position of raster token j,
    so ``x_raster = x_cube[inv]``. See the module docstring for the partial-cube rule.
    """
    grid = _check_triple("grid", grid)
    cube = _check_triple("cube", cube)
    perm, inv = _cube_permutation_cached(grid, cube)
    return perm.clone(), inv.clone()


@lru_cache(maxsize=64)
def _cube_permutation_cached(grid, cube):
    pos = raster_positions(grid)  # [S, 3]
    dims = torch.tensor(grid)
    csize = torch.tensor(cube)
    n_cubes = (dims + csize - 1) // csize  # cubes per dimension, partial ones included
    cidx = pos // csize  # cube coordinates of each token
    inner = pos % csize  # coordinates inside the cube
    extent = torch.minimum(csize, dims - cidx * csize)  # this token's cube's size per dim
    cut = extent < csize  # which dims of its cube are partial
    group = cut[:, 0].long() * 4 + cut[:, 1].long() * 2 + cut[:, 2].long()  # 0 = full cube
    cube_raster = (cidx[:, 0] * n_cubes[1] + cidx[:, 1]) * n_cubes[2] + cidx[:, 2]
    inner_raster = (inner[:, 0] * csize[1] + inner[:, 1]) * csize[2] + inner[:, 2]
    vol = math.prod(cube)
    total_cubes = int(n_cubes.prod())
    key = (group * total_cubes + cube_raster) * vol + inner_raster  # unique per token
    perm = torch.argsort(key)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return perm, inv


class CubeLayout:
    """Cube-major token layout of one latent grid; move tokens and positions in and out of it.

    Args:
        grid: latent token grid (T, H, W) (after patchify).
        cube: cube shape (t, h, w); with DSV this is ``DSVConfig.cube``.
    """

    def __init__(self, grid: Sequence[int], cube: Sequence[int]):
        self.grid = _check_triple("grid", grid)
        self.cube = _check_triple("cube", cube)
        self.perm, self.inv = cube_permutation(self.grid, self.cube)
        self.num_tokens = self.perm.numel()
        self.cube_volume = math.prod(self.cube)
        self.num_full_cubes = math.prod(g // c for g, c in zip(self.grid, self.cube))
        self._device_cache = {}

    def __repr__(self):
        return (f"CubeLayout(grid={self.grid}, cube={self.cube}, tokens={self.num_tokens}, "
                f"full_cubes={self.num_full_cubes})")

    @property
    def num_full_cube_tokens(self) -> int:
        """Tokens in full cubes: they come first, one cube per cube_volume-sized block."""
        return self.num_full_cubes * self.cube_volume

    def _indices(self, device: torch.device):
        device = torch.device(device)
        if device not in self._device_cache:
            self._device_cache[device] = (self.perm.to(device), self.inv.to(device))
        return self._device_cache[device]

    def _check(self, x: torch.Tensor, seq_dim: int):
        if x.dim() <= seq_dim or x.shape[seq_dim] != self.num_tokens:
            raise ValueError(
                f"expected {self.num_tokens} tokens (grid {self.grid}) on dim {seq_dim}, got shape "
                f"{tuple(x.shape)}"
            )

    def to_cube(self, x: torch.Tensor, seq_dim: int = 0) -> torch.Tensor:
        """Raster order -> cube order along ``seq_dim`` (0 for [s, b, ...], 1 for [b, s, ...])."""
        self._check(x, seq_dim)
        return x.index_select(seq_dim, self._indices(x.device)[0])

    def from_cube(self, x: torch.Tensor, seq_dim: int = 0) -> torch.Tensor:
        """Cube order -> raster order along ``seq_dim``; the inverse of :meth:`to_cube`."""
        self._check(x, seq_dim)
        return x.index_select(seq_dim, self._indices(x.device)[1])

    def to_cube_sbh(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, ...] raster -> cube order."""
        return self.to_cube(x, 0)

    def from_cube_sbh(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, ...] cube -> raster order."""
        return self.from_cube(x, 0)

    def to_cube_bsh(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, ...] raster -> cube order."""
        return self.to_cube(x, 1)

    def from_cube_bsh(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, ...] cube -> raster order."""
        return self.from_cube(x, 1)

    def positions(self, device=None) -> torch.Tensor:
        """[S, 3] int64 (t, h, w) latent coordinates of the tokens, in cube order (for 3D RoPE)."""
        pos = raster_positions(self.grid)[self.perm]
        return pos if device is None else pos.to(device)
