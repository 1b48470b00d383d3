"""megatron_dsv: DSV dynamic sparse attention for video DiT training on Megatron-Core."""

from .config import DSVConfig, add_dsv_args

__version__ = "0.1.0"
__all__ = ["DSVConfig", "add_dsv_args"]
