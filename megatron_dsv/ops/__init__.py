"""DSV ops: block-sparse attention, block selection, dense attention.

Every op has a pure-torch reference (any device) and a Triton fast path (GPU).
"""

from .block_sparse import block_sparse_attention
from .dense import dense_attention
from .segments import Segments
from .selection import select_blocks

__all__ = ["block_sparse_attention", "select_blocks", "dense_attention", "Segments"]
