"""The two-stage schedule of one DSV attention layer.

Stage 1: dense attention; the predictor trains every step; sparsity is profiled every
``profile_interval_stage1`` steps. It ends once the predictor loss (EMA) is below
``loss_threshold`` after ``stage1_min_steps`` steps, or after ``stage1_max_steps``.
Stage 2: the layer may compute sparse attention, with per-head budgets from its budget policy
(``budget.py``: the theta rule, or a compute target spread by the heads' mass curves and
annealed in from the switch); every ``profile_interval_stage2`` steps it profiles again and
fine-tunes the predictor at ``predictor_lr * stage2_lr_factor``.

The profiled statistics are EMAs, except that a head's block sparsity never stays above its
latest profile: a budget grows at once when a profile needs more blocks and shrinks only along
the EMA. With a plain EMA, a head whose attention spreads out as it trains keeps a lagging,
too-small budget for many profiles (recall below theta); fewer blocks only cost time.

All state lives in buffers (saved, loaded and TP-sharded with the model); decisions read a
host-side mirror refreshed only when the state changes, so forwards never sync the device. The
predictor loss's EMA and the last recorded loss are the mirror's between checkpoints: they reach
their buffers when a state dict is saved or loaded.
"""

from __future__ import annotations

import math
import struct
from typing import List, Optional

import torch

from ..config import DSVConfig
from .budget import CURVE_POINTS, BudgetPolicy, block_range, theta_blocks
from .fp32_state import Float32State

# Profiled per-head EMAs (RowProfile's statistics and the selection's recall).
PER_HEAD_BUFFERS = ("token_sparsity", "block_sparsity", "oracle_block_sparsity", "recall")
# Everything a profile records: the per-head scalars and each head's mass curve [heads, CURVE_POINTS + 1].
PROFILED = (*PER_HEAD_BUFFERS, "mass_curve")
# Columns of profiled_columns: the per-head scalars, then the mass curve.
PROFILE_COLUMNS = len(PER_HEAD_BUFFERS) + CURVE_POINTS + 1


def profiled_columns(stats) -> torch.Tensor:
    """Every PROFILED statistic in `stats` (a mapping, or an object with those attributes) side by side,
    [heads, PROFILE_COLUMNS]: one tensor to accumulate into, reduce or read from the device at once."""
    get = stats.get if isinstance(stats, dict) else (lambda name: getattr(stats, name))
    return torch.cat([torch.stack([get(name) for name in PER_HEAD_BUFFERS], dim=1), get("mass_curve")], dim=1)


def split_profiled(columns: torch.Tensor) -> dict:
    """profiled_columns' tensor back to {name: tensor} for every name in PROFILED."""
    per_head = len(PER_HEAD_BUFFERS)
    return {**{name: columns[:, i] for i, name in enumerate(PER_HEAD_BUFFERS)}, "mass_curve": columns[:, per_head:]}
# Density grid on which the theta rule's density at the stage switch is read (a fraction of the blocks).
_SWITCH_GRID = 1 << 16


class StageController(Float32State):
    def __init__(self, cfg: DSVConfig, heads: int, device=None):
        super().__init__()
        self.cfg = cfg
        self.heads = heads
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("stage", torch.ones((), dtype=torch.int64, device=device))
        # The predictor loss's EMA, and the last recorded loss, folded into it when the next one is recorded
        # (NaN: none). Both live on the host between checkpoints (_save_to_state_dict writes them here).
        self.register_buffer("loss_ema", torch.full((), float("nan"), device=device))
        self.register_buffer("loss_pending", torch.full((), float("nan"), device=device))
        self.register_buffer("profiles", torch.zeros((), dtype=torch.int64, device=device))
        for name in PER_HEAD_BUFFERS:
            self.register_buffer(name, torch.full((heads,), float("nan"), device=device))
        self.register_buffer("mass_curve", torch.full((heads, CURVE_POINTS + 1), float("nan"), device=device))
        # Annealing of the target policies: the step stage 2 began at and the density it began from.
        self.register_buffer("stage2_start", torch.full((), -1, dtype=torch.int64, device=device))
        self.register_buffer("anneal_from", torch.full((), float("nan"), device=device))
        self.policy = BudgetPolicy(cfg, heads, owner=self)
        self._host: Optional[dict] = None
        # The last recorded loss: a float, or (pinned host scalar, CUDA event) of its copy to the host under way.
        self._pending_loss = math.nan
        self._loss_copy = None     # the pair a copy uses, made once: a pinned allocation per step costs host time
        self._profile_copy = None  # (pinned host columns, CUDA event) of the last profile's copy to the host

    # ------------------------------------------------------------ host mirror
    def host(self) -> dict:
        """Python copies of the state: read from the buffers once after construction or a load, and the
        statistics of the last profile at the first read after it (which waits for the step that
        profiled, if its copy is still under way)."""
        mirror = self._mirror()
        if self._profile_copy is not None:
            columns, done = self._profile_copy
            self._profile_copy = None
            done.synchronize()
            mirror.update(_profiled_lists(columns))
            self.policy.invalidate()
        return mirror

    def _mirror(self) -> dict:
        """host() without taking in a profile copy under way: for what reads only the step, stage,
        loss and profile count (the bookkeeping right after a replayed step reads no more)."""
        if self._host is None:
            self._host = {
                "step": int(self.step), "stage": int(self.stage), "loss_ema": float(self.loss_ema),
                "profiles": int(self.profiles), **self._profiled_on_host(),
                "stage2_start": int(self.stage2_start), "anneal_from": float(self.anneal_from),
            }
            self.policy.invalidate()
            if self._host["stage"] == 2 and self._host["stage2_start"] < 0:
                self._start_anneal()  # a checkpoint from before the target policies: anneal from here
        return self._host

    def _profiled_on_host(self) -> dict:
        """The mirror's copies of the PROFILED buffers, in one read of the device (each read waits for it)."""
        return _profiled_lists(profiled_columns(self).cpu())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before a statistic existed: it starts unprofiled (NaN), and a run already
        # in stage 2 starts annealing at its first step under this code (host()).
        if prefix + "block_sparsity" in state_dict:
            for name in ("oracle_block_sparsity", "mass_curve", "anneal_from", "stage2_start", "loss_pending"):
                if prefix + name not in state_dict:
                    buf = getattr(self, name)
                    state_dict[prefix + name] = torch.full_like(buf, -1 if name == "stage2_start" else float("nan"))
        for name, valid, rule in (("stage", lambda v: v in (1, 2), "1 or 2"), ("step", lambda v: v >= 0, "at least 0")):
            value = state_dict.get(prefix + name)
            if value is not None and not valid(int(value)):   # (else the layer stays dense, or never profiles, silently)
                raise ValueError(f"DSV state {prefix}{name}={int(value)} must be {rule}: not a checkpoint this "
                                 "code wrote, or an edited one")
        self._store_loss()   # a partial state dict (strict=False) without them keeps the live ones
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host = None
        self._profile_copy = None
        self._pending_loss = self._loss_to_host(self.loss_pending)   # the first record then waits for nothing

    def _apply(self, fn, *args, **kwargs):
        self._loss_copy = None   # moved: the next copy records an event of the new device
        return super()._apply(fn, *args, **kwargs)

    def _save_to_state_dict(self, *args, **kwargs):
        self._store_loss()
        super()._save_to_state_dict(*args, **kwargs)

    def _store_loss(self) -> None:
        """Write the loss EMA and the pending loss into their buffers. The host holds them between
        checkpoints: writing both to the device at every record cost two launches per layer and step
        (bench/host_time.py)."""
        if self._host is not None:   # (None: the buffers hold the state loaded or made)
            self.loss_ema.fill_(self._host["loss_ema"])
        self.loss_pending.fill_(self._pending_value())

    # -------------------------------------------------------------- decisions
    @property
    def in_stage2(self) -> bool:
        return self._mirror()["stage"] == 2

    def train_predictor_now(self) -> bool:
        h = self._mirror()
        return h["stage"] == 1 or h["step"] % self.cfg.profile_interval_stage2 == 0

    def profile_now(self) -> bool:
        h = self._mirror()
        every = self.cfg.profile_interval_stage1 if h["stage"] == 1 else self.cfg.profile_interval_stage2
        return h["step"] % every == 0

    def learns_now(self) -> bool:
        """Whether this step's training backward trains the predictor or profiles (reading true attention
        rows of sampled cubes); its statistics are recorded when the step ends."""
        return (self.cfg.estimator == "lowrank" and self.train_predictor_now()) or self.profile_now()

    def predictor_lr(self) -> float:
        factor = self.cfg.stage2_lr_factor if self.in_stage2 else 1.0
        return self.cfg.predictor_lr * factor

    def budgets(self, n_kv: int) -> List[int]:
        """Per-head number of KV blocks out of n_kv, by the budget policy (cached until the state changes)."""
        return list(self.policy.blocks(self.host(), n_kv))

    def held_mass(self, n_kv: int) -> List[float]:
        """Mass each head's budget holds by its profiled mass curve (NaN before the first profile)."""
        return list(self.policy.held(self.host(), n_kv))

    def may_run_sparse(self) -> bool:
        """Stage 2 and, under the theta rule, a layer sparse enough (cost dispatch decides the rest)."""
        return self.policy.layer_eligible(self.host())

    def annealing(self) -> bool:
        """Whether the budgets are still annealing towards target_density (stage 2, a target policy)."""
        h = self._mirror()
        return (h["stage"] == 2 and self.cfg.budget_policy != "theta"
                and h["step"] - h["stage2_start"] < self.cfg.anneal_steps)

    def _theta_density(self) -> float:
        """The theta rule's share of the blocks now (bounded by the floor and ceiling; 1 before any profile)."""
        lo, hi = block_range(_SWITCH_GRID, self.cfg.budget_floor, self.cfg.budget_ceiling)
        return sum(theta_blocks(self.host()["block_sparsity"], _SWITCH_GRID, lo, hi)) / (self.heads * _SWITCH_GRID)

    def _start_anneal(self) -> None:
        h = self._host
        # The mirror holds what the float32 buffer holds, so a resumed run anneals identically.
        h["stage2_start"], h["anneal_from"] = h["step"], _float32(self._theta_density())
        self.stage2_start.fill_(h["stage2_start"])
        self.anneal_from.fill_(h["anneal_from"])
        self.policy.invalidate()

    # ---------------------------------------------------------------- updates
    @torch.no_grad()
    def record_loss(self, loss: torch.Tensor) -> None:
        """Record this step's predictor loss (a device scalar) without waiting for it: the EMA takes in
        the previously recorded loss, whose copy to the host started when it was recorded (a step ago
        in stage 1, a profile interval ago in stage 2), and this one's copy starts now. Reading each
        loss at once cost a device sync per layer per stage-1 step, which stopped the host from
        running ahead of the GPU. So the loss EMA, and the stage switch it decides, run one record
        behind; a checkpoint holds the pending loss, so a resumed run folds what an uninterrupted
        one would."""
        self._fold_pending()
        self._pending_loss = self._loss_to_host(loss.detach())

    def _loss_to_host(self, loss: torch.Tensor):
        """_pending_loss for the scalar `loss`: its copy to the host started (on the GPU), or its value."""
        if not loss.is_cuda:
            return float(loss)
        self._loss_copy = _copy_to_host(loss, self._loss_copy)
        return self._loss_copy

    def _pending_value(self) -> float:
        if isinstance(self._pending_loss, tuple):
            host, done = self._pending_loss
            done.synchronize()   # recorded a training step ago: in practice already complete
            return float(host)
        return self._pending_loss

    def _fold_pending(self) -> None:
        loss, self._pending_loss = self._pending_value(), math.nan
        if not math.isfinite(loss):   # none pending (NaN), or a step whose q or k overflowed: not folded
            return
        a = self.cfg.ema_alpha
        old = self._mirror()["loss_ema"]
        new = loss if math.isnan(old) else a * old + (1 - a) * loss
        self._mirror()["loss_ema"] = _float32(new)  # what the float32 buffer holds once written

    @torch.no_grad()
    def record_profile(self, profiled: dict) -> None:
        """Fold one profile ({name: tensor} for every name in PROFILED) into the EMAs."""
        a = self.cfg.ema_alpha
        host = self._mirror()  # built before the buffers change, so it is not counted twice
        for name in PROFILED:
            buf = getattr(self, name)
            new = profiled[name].to(buf)
            ema = torch.where(torch.isnan(buf), new, a * buf + (1 - a) * new)
            if name == "block_sparsity":
                ema = torch.minimum(ema, new)
            # A profile of non-finite q or k (a step that overflowed) leaves the EMA where it was.
            buf.copy_(torch.where(torch.isfinite(new), ema, buf))
        self.profiles += 1   # (a skipped profile is still counted: it was a profile step)
        host["profiles"] += 1
        if self.profiles.is_cuda:
            # The mirror takes the new values at its next read (host()), not now: a step replayed from a
            # CUDA graph records its profile right after the launch, and reading the device here waited
            # for the whole step, with the optimizer's launches and the other layers' upkeep still to come
            # (~20 ms of host time per profile step of `small` in the traces of bench/results/step_h200/s8).
            self._profile_copy = _copy_to_host(profiled_columns(self))
        else:
            host.update(self._profiled_on_host())
        self.policy.invalidate()

    @torch.no_grad()
    def end_step(self) -> None:
        """Count one training step and switch stage when stage 1's exit condition holds."""
        h = self._mirror()
        h["step"] += 1
        self.step.fill_(h["step"])
        if h["stage"] != 1 or h["step"] < self.cfg.stage1_min_steps:
            return
        learned = self.cfg.estimator == "pooled" or h["loss_ema"] < self.cfg.loss_threshold
        if learned or h["step"] >= self.cfg.stage1_max_steps:
            h["stage"] = 2
            self.stage.fill_(2)
            self._start_anneal()


def _float32(x: float) -> float:
    """x rounded to float32, as a float32 buffer holds it (struct: no tensor made for one number)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _copy_to_host(t: torch.Tensor, into: Optional[tuple] = None) -> tuple:
    """(pinned host tensor, event): a copy of the device tensor t started without waiting for it; the host
    reads it once the event is done. `into`: such a pair to reuse (a copy into it still under way, e.g. a
    load's, unread, ends first)."""
    if into is None:
        into = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True), torch.Event(t.device))
    host, done = into
    done.synchronize()
    host.copy_(t, non_blocking=True)
    # (torch.accelerator's stream lookup costs ~3 us of host time, torch.cuda.current_stream()'s ~7)
    done.record(torch.accelerator.current_stream(t.device))
    return into


def _profiled_lists(columns: torch.Tensor) -> dict:
    """profiled_columns' tensor (on the host) as the mirror holds it: lists per head, the curves as tuples."""
    columns = split_profiled(columns)
    return {**{name: columns[name].tolist() for name in PER_HEAD_BUFFERS}, "mass_curve": _rows(columns["mass_curve"])}


def _rows(t: torch.Tensor) -> tuple:
    """A [heads, points] tensor as nested tuples: a host copy that compares and hashes by value."""
    return tuple(map(tuple, t.tolist()))
