"""3D cube token layout for video latents: cube-major permutation, its inverse, 3D positions."""

from .layout import CubeLayout, cube_permutation, raster_positions

__all__ = ["CubeLayout", "cube_permutation", "raster_positions"]
