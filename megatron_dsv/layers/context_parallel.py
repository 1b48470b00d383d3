"""The context-parallel side of one DSV layer (context_parallel_size > 1).

Wraps megatron_dsv.cp for DSVDotProductAttention: the hybrid group built from Megatron's
CP ranks, the layer's plan (re-planned every ``cp_replan_interval`` steps from the budgets,
identical on every rank because the budgets are; the (U, schedule) pair chosen once per shape
by timing the model's short list, ``cp_plan_search``), and the two paths:

- dense (stage 1, or a layer that stays dense): head all-to-all + K/V all-gather over the
  sequence-parallel ranks (``dense_cp_attention``);
- sparse (stage 2): ``dsv_cp_attention`` (head all-to-all by the plan, the rank-r projections
  first so that selection on the whole sequence of each rank's heads runs while q, k and v
  cross, sparse KV exchange, reverse all-to-all).

Both can also hand back what the predictor and profiler learn from: this rank's heads,
the queries of its sequence segment and the keys of the whole sequence (detached).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Sequence

import torch

from ..cp import (HybridCPGroup, Shape, candidate_plans, dense_cp_attention, dsv_cp_attention, fastest_plan,
                  gather_segments, plan, seq_to_head)


def _default_head_parallel(P: int, heads: int, max_u: int = 8) -> int:
    """Largest divisor of P that is at most the number of heads and a node's 8 GPUs."""
    return max(u for u in range(1, P + 1) if P % u == 0 and u <= min(heads, max_u))


# Codes of the dtypes check_shard compares across ranks (a mismatch would abort in the backend's C++ code).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SHARD_NAMES = ("query tokens", "batch", "heads", "head dim", "dtype (code)", "packed clips (digest)")
STATE_NAMES = ("stage", "step", "runs sparse", "learns")


def _field_code(value) -> int:
    """A DSVConfig field as an int every process computes alike: ints as they are, other values by a
    CRC of their repr (Python's hash of strings differs from process to process)."""
    if isinstance(value, int):
        return int(value)
    return zlib.crc32(repr(value).encode())


class LayerContextParallel:
    def __init__(self, cfg, heads: int, head_dim: int, process_group, ranks):
        self.cfg = cfg
        self.group = HybridCPGroup(process_group=process_group, ranks=ranks)
        self.heads, self.head_dim = heads, head_dim
        self.dense_U = cfg.cp_head_parallel_size or _default_head_parallel(self.group.size, heads)
        if self.group.size % self.dense_U or self.dense_U > heads:
            raise ValueError(f"DSVConfig.cp_head_parallel_size={self.dense_U} must divide the context-parallel "
                             f"size {self.group.size} and be at most the {heads} heads")
        # Stage-1 head assignment: contiguous chunks (uneven when U does not divide the heads).
        self.dense_heads_of = tuple(tuple(h for h in range(heads) if h * self.dense_U // heads == u)
                                    for u in range(self.dense_U))
        self._plans, self._plan_interval = {}, None
        self._pairs = {}   # (seq_len, batch) -> the measured (U, schedule), kept across re-plans
        self._fields = tuple(f.name for f in dataclasses.fields(cfg))
        self._config_names = tuple(f"DSVConfig.{name}" for name in self._fields)
        self._config_key = self._config = None

    def _config_codes(self) -> tuple:
        """_field_code of every DSVConfig field, recomputed only when a field changed (the CRCs cost ~20 us
        per forward; reading the fields a few)."""
        key = tuple(getattr(self.cfg, name) for name in self._fields)
        if key != self._config_key:
            self._config_key, self._config = key, tuple(_field_code(v) for v in key)
        return self._config

    @property
    def size(self) -> int:
        return self.group.size

    def check_shard(self, q: torch.Tensor, layer: str, segments=None, state: Sequence[int] = ()) -> None:
        """Every rank's share: the same shape and dtype on all CP ranks (and the same packed clips, whose
        boundaries every rank must read alike), whole cubes and blocks; the same DSVConfig and layer
        `state` (STATE_NAMES: stage, step, this call's decisions) on every rank, which the collectives'
        sizes and the plan follow (ranks that disagree abort in the backend's C++ code, or compute
        wrong results without an error)."""
        clips = 0 if segments is None else hash(segments)   # by value, over ints: the same on every process
        self.group.check_same(layer, (*q.shape, _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1, clips,
                                      *self._config_codes(), *state),
                              names=(*SHARD_NAMES, *self._config_names, *STATE_NAMES[:len(state)]))
        s_local = q.shape[0]
        blk = max(self.cfg.block_q, self.cfg.block_kv)
        if s_local % blk:
            raise ValueError(f"context parallel: each rank must hold whole cubes/blocks; its {s_local} tokens are "
                             f"not a multiple of max(block_q, block_kv)={blk}")

    def _learn_view(self, heads, q_seg, k_full):
        """What the predictor and profiler learn from: (heads, q of this rank's segment [seg, b, n, d],
        k of the whole sequence [S, b, n, d], no selection, the segment's first token)."""
        return list(heads), q_seg, k_full, None, self.group.grid(self.dense_U).j * q_seg.shape[0]

    def learn_inputs(self, q, k):
        with torch.no_grad():
            q_seg = seq_to_head(q.detach(), self.group, self.dense_U, self.dense_heads_of)
            k_seg = seq_to_head(k.detach(), self.group, self.dense_U, self.dense_heads_of)
            k_full = gather_segments(k_seg.contiguous(), self.group, self.dense_U)
        return self._learn_view(self.dense_heads_of[self.group.grid(self.dense_U).u], q_seg, k_full)

    def dense(self, q, k, v, scale, want_learn: bool, segments=None):
        """Stage-1 attention; with want_learn also the learn view (else None)."""
        opts = dict(group=self.group, U=self.dense_U, heads_of=self.dense_heads_of, scale=scale, segments=segments)
        if not want_learn:
            return dense_cp_attention(q, k, v, **opts), None
        out, (heads, q_seg, k_full) = dense_cp_attention(q, k, v, return_heads=True, **opts)
        return out, self._learn_view(heads, q_seg, k_full)

    def plan_for(self, budgets, seq_len: int, batch: int, step: int, measure=None):
        """The plan of this replan interval for a sequence of seq_len tokens (one per length and batch
        met in the interval: packed batches vary in length, and planning takes tens of milliseconds).
        measure: None, or step(plan) running the layer's attention forward + backward under a plan: the
        first time a shape is met, the model's best plan of each (U, schedule) is timed with it and the
        fastest pair is kept for every later re-plan of that shape."""
        interval = step // self.cfg.cp_replan_interval
        if interval != self._plan_interval:
            self._plans, self._plan_interval = {}, interval
        key = (seq_len, batch)
        if key not in self._plans:
            shape = Shape(seq_len, self.heads, self.head_dim, batch=batch, block_q=self.cfg.block_q,
                          block_kv=self.cfg.block_kv, lr_rank=self.cfg.rank)
            U = [self.cfg.cp_head_parallel_size] if self.cfg.cp_head_parallel_size else None
            if key not in self._pairs and measure is not None:
                cands = candidate_plans(list(budgets), shape=shape, P=self.size, U_candidates=U)
                best, times = fastest_plan(cands, measure, self.group)
                self._pairs[key] = (best.U, best.schedule)
                if self.group.index == 0:
                    print(f"megatron_dsv: context-parallel plan for {seq_len} tokens x batch {batch} on {self.size} "
                          "ranks, measured fwd+bwd: " + ", ".join(
                              f"U={p.U} {p.schedule} {t:.1f} ms" for p, t in zip(cands, times))
                          + f" -> U={best.U} {best.schedule}", flush=True)
            if key in self._pairs:
                U_pair, schedule = self._pairs[key]
                self._plans[key] = plan(list(budgets), shape=shape, P=self.size, U_candidates=[U_pair],
                                        schedules=[schedule])
            else:
                self._plans[key] = plan(list(budgets), shape=shape, P=self.size, U_candidates=U)
        return self._plans[key]

    def _search(self, q) -> bool:
        mode = self.cfg.cp_plan_search
        return mode == "measured" or (mode == "auto" and q.is_cuda)

    def sparse(self, q, k, v, predictor, budgets, scale, step: int, segments=None, deterministic=False):
        """Stage-2 attention. budgets: per-head ints, or an int tensor [heads, clips] for packed clips.
        deterministic: reproducible kernels only (the layer's DSVConfig and Megatron's deterministic_mode)."""
        s_local, b = q.shape[:2]
        plan_budgets = budgets if segments is None else _work_budgets(budgets, segments, self.cfg)
        opts = dict(group=self.group, block_q=self.cfg.block_q, block_kv=self.cfg.block_kv, scale=scale,
                    backend=self.cfg.backend, segments=segments, deterministic=deterministic)

        def measure(p):   # the layer's attention under plan p, forward + backward, on detached copies
            with torch.enable_grad():
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                out = dsv_cp_attention(qq, kk, vv, predictor.wq.detach(), predictor.wk.detach(),
                                       torch.as_tensor(budgets), plan=p, **opts)
                out.backward(torch.ones_like(out))

        cp_plan = self.plan_for(plan_budgets, s_local * self.size, b, step,
                                measure=measure if self._search(q) else None)
        return dsv_cp_attention(q, k, v, predictor.wq, predictor.wk, torch.as_tensor(budgets), plan=cp_plan, **opts)


def _work_budgets(budgets: torch.Tensor, segments, cfg) -> list:
    """Per-head budgets [heads, clips] of packed clips as the one per-head budget the planner's cost
    model takes (blocks per query block over the whole packing): each clip counts with its query
    blocks, so a head's predicted work is its real work, sum over clips of query blocks x budget."""
    q_blocks = torch.tensor(segments.blocks_per_clip(cfg.block_q), dtype=torch.float64)
    n_q = -(-segments.total // cfg.block_q)
    return [math.ceil(w) for w in (budgets.double() @ q_blocks / n_q).tolist()]
