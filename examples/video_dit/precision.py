"""bf16 training with fp32 master weights, the way Megatron trains in bf16 (Float16Module + a
mixed-precision optimizer), in a few lines for a single process.

The model's trainable parameters are cast to bf16, so every matmul, norm and attention
runs in bf16 and q, k, v reach core attention in one dtype. Non-trainable state (the DSV
predictor's weights and Adam moments, the stage controller's EMAs, RoPE angles, caption
table) stays float32. The optimizer steps fp32 master copies; after each step they are
copied back into the bf16 parameters. Both copies are multi-tensor (``torch._foreach_copy_``)
into persistent buffers: a copy launch per parameter would cost more host time than the GPU
work of a small model's step (the way Megatron keeps its main_grad buffers).
"""

from __future__ import annotations

from typing import List

import torch


class MasterWeights:
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.params: List[torch.nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self._grads = [torch.zeros_like(m) for m in self.master]
        for p in self.params:
            p.data = p.data.to(dtype)

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """Move the bf16 gradients onto the fp32 masters (and free the bf16 ones)."""
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        if have:
            torch._foreach_copy_([self._grads[i] for i in have], [self.params[i].grad for i in have])
        for i, (p, m) in enumerate(zip(self.params, self.master)):
            m.grad = self._grads[i] if p.grad is not None else None
            p.grad = None

    @torch.no_grad()
    def master_to_params(self) -> None:
        torch._foreach_copy_(self.params, self.master)

    def state_dict(self) -> dict:
        return {"master": [m.detach() for m in self.master]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for m, saved in zip(self.master, state["master"]):
            m.copy_(saved)
        self.master_to_params()
