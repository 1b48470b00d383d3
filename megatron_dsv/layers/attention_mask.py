"""Whether an `attention_mask` passed to a core attention masks nothing, read once per mask.

The DSV and SDPA core attentions compute full attention; Megatron passes them an attention_mask that
is None or, in some recipes, a boolean tensor (True = masked out) that masks nothing. Telling the two
apart reads the tensor, which waits for the device: once per layer and step, that is as many host
syncs per step as there are layers, each one emptying the launch queue. The layers of one step get
the same mask object, so the last mask found empty is remembered (by identity, and by its version
counter, which in-place writes through torch ops advance) and read again only when another mask, or a
changed one, comes.

Limits: writes that bypass the version counter (through `.data`, a NumPy view, a collective or a
custom kernel writing into the mask) are not seen, so a mask must not be written that way between
the calls that share it; an inference-mode mask has no version counter and is read at every call.
Inside a CUDA graph capture nothing is read (a read would sync with the device, and a replay would
not check later masks): a mask is refused there with its own error.
"""

from __future__ import annotations

import weakref

import torch

_last_empty = (None, -1)   # (weak reference to the last mask found to mask nothing, its version then)


@torch.compiler.disable   # (reading the mask's values is a graph break anyway)
def masks_nothing(mask, name: str) -> bool:
    """True where `mask` is a tensor with no True (nonzero) entry. name: the caller, for the error."""
    global _last_empty
    if not torch.is_tensor(mask):
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"{name}: an attention_mask tensor cannot be checked inside a CUDA graph capture "
                         "(reading it would sync with the device, and replays would not check later masks): "
                         "pass attention_mask=None, which it treats as full attention")
    if mask.is_inference():   # (no version counter: read every time)
        return not bool(mask.any())
    ref, version = _last_empty
    if ref is not None and ref() is mask and version == mask._version:
        return True
    if bool(mask.any()):
        return False
    _last_empty = (weakref.ref(mask), mask._version)
    return True
