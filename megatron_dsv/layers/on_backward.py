"""An identity on a tensor whose backward first calls a function: work that must happen once per
backward pass of a layer's output (DSV bookkeeping, releasing a replayed CUDA graph)."""

from __future__ import annotations

from typing import Callable

import torch


class OnBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: torch.Tensor, fn: Callable[[], None]) -> torch.Tensor:
        ctx.fn = fn
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            ctx.fn()
        ctx.fn = None
        return grad, None
