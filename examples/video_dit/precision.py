"""bf16 training with fp32 master weights, the way Megatron trains in bf16 (Float16Module + a
mixed-precision optimizer), in a few lines for a single process.

The model's trainable parameters are cast to bf16, so every matmul, norm and attention
runs in bf16 and q, k, v reach core attention in one dtype. Non-trainable state (the DSV
predictor's weights and Adam moments, the stage controller's EMAs, RoPE angles, caption
table) stays float32. The optimizer steps fp32 master copies; after each step they are
copied back into the bf16 parameters.
"""

from __future__ import annotations

from typing import List

import torch


class MasterWeights:
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.params: List[torch.nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        for p in self.params:
            p.data = p.data.to(dtype)

    def grads_to_master(self) -> None:
        """Move the bf16 gradients onto the fp32 masters (and free the bf16 ones)."""
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def master_to_params(self) -> None:
        for p, m in zip(self.params, self.master):
            p.copy_(m)

    def state_dict(self) -> dict:
        return {"master": [m.detach() for m in self.master]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for m, saved in zip(self.master, state["master"]):
            m.copy_(saved)
        self.master_to_params()
