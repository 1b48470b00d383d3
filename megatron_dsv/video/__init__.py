"""Video latents for DSV: cube-major token layout (permutation, inverse, 3D positions) and packing
of clips of different shapes into one sequence."""

from .layout import CubeLayout, cube_permutation, raster_positions
from .packing import PackedClips

__all__ = ["CubeLayout", "PackedClips", "cube_permutation", "raster_positions"]
