"""Whether an `attention_mask` passed to a core attention masks nothing, read once per mask.

The DSV and SDPA core attentions compute full attention; Megatron passes them an attention_mask that
is None or, in some recipes, a boolean tensor (True = masked out) that masks nothing. Telling the two
apart reads the tensor, which waits for the device: once per layer and step, that is as many host
syncs per step as there are layers, each one emptying the launch queue. The layers of one step get
the same mask object, so it is read once per object and version (read_once.py, with its limits).
Inside a CUDA graph capture nothing is read (a read would sync with the device, and a replay would
not check later masks): a mask is refused there with its own error.
"""

from __future__ import annotations

import torch

from .read_once import ReadOnce

_empty = ReadOnce(lambda mask: not bool(mask.any()))


@torch.compiler.disable   # (reading the mask's values is a graph break anyway)
def masks_nothing(mask, name: str) -> bool:
    """True where `mask` is a tensor with no True (nonzero) entry. name: the caller, for the error."""
    if not torch.is_tensor(mask):
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"{name}: an attention_mask tensor cannot be checked inside a CUDA graph capture "
                         "(reading it would sync with the device, and replays would not check later masks): "
                         "pass attention_mask=None, which it treats as full attention")
    return _empty(mask)
