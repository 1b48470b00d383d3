"""Example video DiT built from Megatron-Core layers (see model.py), with DSV by config."""

from .configs import PRESETS, DiTConfig
from .data import MovingShapes, moving_shapes_clip
from .flow import euler_sample, flow_matching_loss
from .model import VideoDiT, build_video_dit, dit_layer_spec, patchify, unpatchify
from .parallel import init_single_process

__all__ = ["PRESETS", "DiTConfig", "MovingShapes", "moving_shapes_clip", "flow_matching_loss", "euler_sample",
           "VideoDiT", "build_video_dit", "dit_layer_spec", "patchify", "unpatchify", "init_single_process"]
