"""The two-stage schedule of one DSV attention layer.

Stage 1: dense attention; the predictor trains every step; sparsity is profiled every
``profile_interval_stage1`` steps. It ends once the predictor loss (EMA) is below
``loss_threshold`` after ``stage1_min_steps`` steps, or after ``stage1_max_steps``.
Stage 2: the layer computes sparse attention if its mean profiled block sparsity is at
least ``layer_sparsity_threshold`` (re-checked at every profile), with per-head budgets
k_h = ceil((1 - s_h) * n_kv) clipped to [budget_floor, budget_ceiling]; every
``profile_interval_stage2`` steps it profiles again and fine-tunes the predictor at
``predictor_lr * stage2_lr_factor``.

The profiled statistics are EMAs, except that a head's block sparsity never stays above its
latest profile: a budget grows at once when a profile needs more blocks and shrinks only along
the EMA. With a plain EMA, a head whose attention spreads out as it trains keeps a lagging,
too-small budget for many profiles (recall below theta); fewer blocks only cost time.

All state lives in buffers (saved, loaded and TP-sharded with the model); decisions read a
host-side mirror refreshed only when the state changes, so forwards never sync the device.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from ..config import DSVConfig
from .fp32_state import Float32State

# Profiled per-head EMAs (RowProfile's statistics and the selection's recall).
PER_HEAD_BUFFERS = ("token_sparsity", "block_sparsity", "oracle_block_sparsity", "recall")


class StageController(Float32State):
    def __init__(self, cfg: DSVConfig, heads: int, device=None):
        super().__init__()
        self.cfg = cfg
        self.heads = heads
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("stage", torch.ones((), dtype=torch.int64, device=device))
        self.register_buffer("loss_ema", torch.full((), float("nan"), device=device))
        self.register_buffer("profiles", torch.zeros((), dtype=torch.int64, device=device))
        for name in PER_HEAD_BUFFERS:
            self.register_buffer(name, torch.full((heads,), float("nan"), device=device))
        self._host: Optional[dict] = None

    # ------------------------------------------------------------ host mirror
    def host(self) -> dict:
        """Python copies of the state; read from the buffers once after construction or a load."""
        if self._host is None:
            self._host = {
                "step": int(self.step), "stage": int(self.stage), "loss_ema": float(self.loss_ema),
                "profiles": int(self.profiles),
                "block_sparsity": self.block_sparsity.tolist(),
            }
        return self._host

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before the oracle sparsity was profiled: it starts unprofiled (NaN).
        key = prefix + "oracle_block_sparsity"
        if prefix + "block_sparsity" in state_dict and key not in state_dict:
            state_dict[key] = torch.full_like(self.oracle_block_sparsity, float("nan"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host = None

    # -------------------------------------------------------------- decisions
    @property
    def in_stage2(self) -> bool:
        return self.host()["stage"] == 2

    def train_predictor_now(self) -> bool:
        h = self.host()
        return h["stage"] == 1 or h["step"] % self.cfg.profile_interval_stage2 == 0

    def profile_now(self) -> bool:
        h = self.host()
        every = self.cfg.profile_interval_stage1 if h["stage"] == 1 else self.cfg.profile_interval_stage2
        return h["step"] % every == 0

    def predictor_lr(self) -> float:
        factor = self.cfg.stage2_lr_factor if self.in_stage2 else 1.0
        return self.cfg.predictor_lr * factor

    def mean_block_sparsity(self) -> float:
        vals = [v for v in self.host()["block_sparsity"] if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else float("nan")

    def budgets(self, n_kv: int) -> List[int]:
        """Per-head number of KV blocks out of n_kv."""
        lo = max(1, math.ceil(self.cfg.budget_floor * n_kv))
        hi = max(lo, math.ceil(self.cfg.budget_ceiling * n_kv))
        out = []
        for s in self.host()["block_sparsity"]:
            k = n_kv if math.isnan(s) else math.ceil((1.0 - s) * n_kv - 1e-9)
            out.append(min(max(k, lo), hi, n_kv))
        return out

    def sparse_now(self, n_kv: int) -> bool:
        """Stage 2, sparse enough a layer, and a budget thin enough that sparse beats dense."""
        if not self.in_stage2 or not self.mean_block_sparsity() >= self.cfg.layer_sparsity_threshold:
            return False
        density = sum(self.budgets(n_kv)) / (self.heads * n_kv)
        return density <= self.cfg.dense_fallback_density

    # ---------------------------------------------------------------- updates
    @torch.no_grad()
    def record_loss(self, loss: float) -> None:
        a = self.cfg.ema_alpha
        old = self.host()["loss_ema"]
        new = loss if math.isnan(old) else a * old + (1 - a) * loss
        new = float(torch.tensor(new, dtype=self.loss_ema.dtype))  # the mirror holds what the buffer holds
        self.loss_ema.fill_(new)
        self._host["loss_ema"] = new

    @torch.no_grad()
    def record_profile(self, profiled: dict) -> None:
        """Fold one profile ({name: [heads] tensor} for every name in PER_HEAD_BUFFERS) into the EMAs."""
        a = self.cfg.ema_alpha
        for name in PER_HEAD_BUFFERS:
            buf = getattr(self, name)
            new = profiled[name].to(buf)
            ema = torch.where(torch.isnan(buf), new, a * buf + (1 - a) * new)
            buf.copy_(torch.minimum(ema, new) if name == "block_sparsity" else ema)
        self.profiles += 1
        host = self.host()
        host["profiles"] += 1
        host["block_sparsity"] = self.block_sparsity.tolist()

    @torch.no_grad()
    def end_step(self) -> None:
        """Count one training step and switch stage when stage 1's exit condition holds."""
        h = self.host()
        h["step"] += 1
        self.step.fill_(h["step"])
        if h["stage"] != 1 or h["step"] < self.cfg.stage1_min_steps:
            return
        learned = self.cfg.estimator == "pooled" or h["loss_ema"] < self.cfg.loss_threshold
        if learned or h["step"] >= self.cfg.stage1_max_steps:
            h["stage"] = 2
            self.stage.fill_(2)
