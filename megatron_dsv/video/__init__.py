"""Video latents for DSV: cube-major token layout (permutation, inverse, 3D positions), packing
of clips of different shapes into one sequence, and one video's contiguous context-parallel shares."""

from .cp_shard import CPShard
from .layout import CubeLayout, cube_permutation, raster_positions
from .packing import PackedClips

__all__ = ["CPShard", "CubeLayout", "PackedClips", "cube_permutation", "raster_positions"]
