"""Keep a module's floating-point state in float32 whatever dtype the model is cast to.

Megatron's bf16/fp16 wrapper (``Float16Module``) calls ``.bfloat16()`` / ``.half()`` on the
whole model, which would turn the predictor's weights, its Adam moments and the profiled
EMAs into bf16: Adam's second moment and small EMA updates do not survive that. Device
moves still apply; only the dtype cast is undone.
"""

from __future__ import annotations

import torch
from torch import nn


class Float32State(nn.Module):
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for tensor in (*self._parameters.values(), *self._buffers.values()):
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
        return self
