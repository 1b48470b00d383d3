"""Core-attention modules with Megatron-Core's constructor and forward signature.

``DSVDotProductAttention`` is the drop-in ``core_attention`` of DSV: dense attention
while its predictor learns (stage 1), then block-sparse attention over the KV blocks
the predictor selects for every query cube (stage 2). ``SDPADotProductAttention`` is
the dense baseline (Transformer Engine or torch SDPA), CPU-capable, used for
dense layers and as the reference in tests.

Both take query/key/value [s, b, heads, d] (tokens in cube order for DSV) and return
[s, b, heads * d], like Megatron's DotProductAttention / TEDotProductAttention.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from ..config import NON_REPRODUCIBLE_BACKENDS, DSVConfig
from ..cp.groups import failures_named
from ..ops import block_sparse_attention, dense_attention, select_blocks
from ..ops.coarse import coarse_remainder
from ..ops.triton_attention import HEAD_DIMS
from ..ops.reference import block_scores_reference, topk_blocks
from ..ops.row_mass import row_block_mass
from .attention_mask import masks_nothing
from .context_parallel import LayerContextParallel
from .device_budgets import DeviceBudgets
from .dispatch import CostDispatch, measure_costs
from .graphed import GraphedSparseAttention
from .graphed_upkeep import GraphedUpkeep
from .megatron_cuda_graphs import check_megatron_cuda_graphs
from .on_backward import OnBackward
from .controller import PER_HEAD_BUFFERS, PROFILE_COLUMNS, StageController, profiled_columns, split_profiled
from .packing import as_sbhd, block_aligned, packed_segments, work_weighted_blocks
from .predictor import LowRankPredictor, key_gram
from .profiler import profile_mass, row_logits, selection_recall, token_rows
from .step_plan import StepPlan
from . import upkeep_stream
from ..timing import ForwardTimer

# Bytes of float32 a profile holds at once per chunk of heads: the token rows' logits (rows x keys) and
# the sampled rows' block masses (rows x KV blocks), each per batch element and head.
LOGIT_CHUNK_BYTES = 256 << 20


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on `device` without waiting for the device: a copy from pageable memory
    would first synchronise the stream, so it goes through pinned memory."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _sliding_window(config: TransformerConfig, layer_number: int) -> bool:
    """Whether Megatron gives this layer a sliding window: window_size set, other than (-1, -1) (unbounded,
    i.e. full attention), and the layer not one that window_attn_skip_freq leaves full."""
    window = getattr(config, "window_size", None)
    if not window or tuple(window) == (-1, -1):
        return False
    try:
        from megatron.core.transformer.utils import is_layer_window_attention
    except ImportError:   # (versions without per-layer windows)
        return True
    return is_layer_window_attention(window, getattr(config, "window_attn_skip_freq", None), max(1, layer_number))


def _mask_name(mask_type) -> str:
    """An AttnMaskType's name, or the repr of whatever else was passed as one (a string, None)."""
    return mask_type.name if isinstance(mask_type, AttnMaskType) else repr(mask_type)


class _CoreAttention(MegatronModule):
    """Constructor checks and head bookkeeping shared by the dense and DSV core attentions."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        name = type(self).__name__
        if attn_mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding):
            raise NotImplementedError(
                f"{name} computes full (bidirectional) attention; attn_mask_type={_mask_name(attn_mask_type)} "
                "is not supported (video DiT self-attention needs no mask)"
            )
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise NotImplementedError(f"{name} has no attention dropout; set attention_dropout=0 (got {dropout})")
        # Variants of the softmax or of its span that Megatron-Core configures here: computing plain full
        # attention instead would be silently wrong (qk_clip and the logit logging read maxima kept here).
        if _sliding_window(config, layer_number):
            raise NotImplementedError(f"{name} computes full attention; TransformerConfig.window_size="
                                      f"{config.window_size!r} gives this layer a sliding window (not supported)")
        for field, plain in (("softmax_type", "vanilla"), ("qk_clip", False), ("log_max_attention_logit", False)):
            value = getattr(config, field, plain)
            if value != plain:
                raise NotImplementedError(f"{name} computes full attention with a plain softmax; "
                                          f"TransformerConfig.{field}={value!r} is not supported (leave it {plain!r})")
        if config.num_query_groups not in (None, config.num_attention_heads):
            raise NotImplementedError(
                f"{name} needs as many KV heads as query heads (no grouped-query attention); got "
                f"num_query_groups={config.num_query_groups}, num_attention_heads={config.num_attention_heads}"
            )
        head_dim = config.kv_channels
        if (k_channels or head_dim) != head_dim or (v_channels or head_dim) != head_dim:
            raise NotImplementedError(f"{name} needs k_channels == v_channels == kv_channels")

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.head_dim = head_dim
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        self.tp_group = pg_collection.tp if pg_collection is not None else (
            parallel_state.get_tensor_model_parallel_group() if parallel_state.model_parallel_is_initialized()
            else None)
        tp_size = _group_size(self.tp_group)
        if config.num_attention_heads % tp_size:
            raise ValueError(f"num_attention_heads={config.num_attention_heads} is not divisible by TP size {tp_size}")
        self.heads = config.num_attention_heads // tp_size
        self.head_offset = (dist.get_rank(self.tp_group) if tp_size > 1 else 0) * self.heads

    def _inputs(self, query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params,
                shards: int = 1, cube=None):
        """Checked (query, key, value) as [s, b, heads, d], the packed format ("thd", "sbhd" or None)
        and the query and key/value Segments of packed sequences (None, None if not packed). With
        context parallelism (`shards` ranks) the tensors hold 1/shards of the packed sequence; `cube`: the
        cube packed clips must be ordered in (None: any)."""
        name = type(self).__name__
        fmt = q_seg = kv_seg = None
        if packed_seq_params is not None:
            q_seg, kv_seg = packed_segments(packed_seq_params, name, cube)
            fmt = packed_seq_params.qkv_format
            query, key, value = (as_sbhd(t, fmt, name) for t in (query, key, value))
            for t_name, t, seg in (("query", query, q_seg), ("key", key, kv_seg)):
                if t.shape[0] * shards != seg.total:
                    ranks = f" x {shards} context-parallel ranks" if shards > 1 else ""
                    raise ValueError(f"{name}: {t_name} holds {t.shape[0]} tokens{ranks} but packed_seq_params "
                                     f"describes {seg.total} (cu_seqlens{'_padded' if seg.is_padded else ''}; "
                                     "padding between or after the sequences goes into cu_seqlens_*_padded)")
        self._check_inputs(query, key, value, attention_mask, attn_mask_type, attention_bias)
        return query, key, value, fmt, q_seg, kv_seg

    @staticmethod
    def _output(out: torch.Tensor, fmt) -> torch.Tensor:
        """[s, b, heads, d] -> [s, b, heads * d], or [t, heads * d] for thd (what TE returns)."""
        s, b = out.shape[:2]
        return out.reshape(s, -1) if fmt == "thd" else out.reshape(s, b, -1)

    def _check_inputs(self, query, key, value, attention_mask, attn_mask_type, attention_bias):
        name = type(self).__name__
        if attention_bias is not None:
            raise NotImplementedError(f"{name} does not support attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding):
            raise NotImplementedError(f"{name} does not support attn_mask_type={_mask_name(mask_type)} (only "
                                      "AttnMaskType.no_mask and .padding)")
        if attention_mask is not None and not masks_nothing(attention_mask, name):
            # Megatron's convention: True = masked out. An all-False mask masks nothing.
            raise NotImplementedError(f"{name} computes full attention; a non-empty attention_mask is not supported")
        for t_name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 4 or t.shape[2] != self.heads or t.shape[3] != self.head_dim:
                raise ValueError(
                    f"{name}: {t_name} must be [s, b, heads={self.heads}, d={self.head_dim}], got {tuple(t.shape)}"
                )
        if key.shape[1] != query.shape[1] or value.shape[:2] != key.shape[:2]:
            raise ValueError(f"{name}: query, key, value must share the batch and key/value the length; got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")


class SDPADotProductAttention(_CoreAttention):
    """Dense core_attention through the best dense kernel (TE if importable, else torch SDPA).

    Serves self- and cross-attention (key/value may be longer or shorter than the query)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        query, key, value, fmt, q_seg, kv_seg = self._inputs(query, key, value, attention_mask, attn_mask_type,
                                                             attention_bias, packed_seq_params)
        out = dense_attention(query, key, value, scale=self.softmax_scale, layout="sbhd", segments=q_seg,
                              kv_segments=kv_seg)
        return self._output(out, fmt)


class DSVDotProductAttention(_CoreAttention):
    """DSV dynamic sparse self-attention as a Megatron-Core ``core_attention``.

    Extra constructor argument: ``dsv_config`` (a :class:`DSVConfig`; ``apply_dsv`` sets it
    through the spec's params). Tokens must arrive in cube order (``megatron_dsv.video``).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, dsv_config: Optional[DSVConfig] = None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, k_channels, v_channels, cp_comm_type, pg_collection)
        if attention_type != "self":
            raise ValueError(f"DSVDotProductAttention is for self-attention, got attention_type={attention_type!r}")
        self.cfg = dsv_config if dsv_config is not None else DSVConfig()
        if not isinstance(self.cfg, DSVConfig):
            raise ValueError(f"dsv_config must be a DSVConfig, got {type(self.cfg).__name__}")
        check_megatron_cuda_graphs(config, "DSVDotProductAttention")
        triton_here = self.cfg.backend != "reference" and (self.cfg.backend != "auto" or torch.cuda.is_available())
        if self.cfg.backend == "cudnn" and self.head_dim != 128:
            raise NotImplementedError(f"DSVDotProductAttention: backend='cudnn' needs head dim 128 (cuDNN's "
                                      f"block-sparse backward), this layer has {self.head_dim} (kv_channels)")
        # Reproducible kernels only: asked for by DSVConfig or by Megatron's deterministic_mode.
        megatron_deterministic = bool(getattr(config, "deterministic_mode", False))
        self.deterministic = self.cfg.deterministic_backward or megatron_deterministic
        if self.cfg.backend in NON_REPRODUCIBLE_BACKENDS and megatron_deterministic:
            raise ValueError(f"DSVDotProductAttention: backend={self.cfg.backend!r} is not bitwise reproducible "
                             "and Megatron's deterministic_mode is on; use backend='auto' or 'triton'")
        if triton_here and self.head_dim not in HEAD_DIMS:
            # Checked now, not at the first stage-2 step after up to stage1_max_steps of training.
            raise NotImplementedError(
                f"DSVDotProductAttention: the Triton kernels support head dims {HEAD_DIMS}, this layer has "
                f"{self.head_dim} (kv_channels); use a supported head dim, or backend='reference' (pure torch)")
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.predictor = LowRankPredictor(self.heads, self.head_dim, self.cfg.rank, seed=self.layer_number,
                                          head_offset=self.head_offset, device=device)
        self.controller = StageController(self.cfg, self.heads, device=device)
        self.timer = ForwardTimer()
        self.dispatch = CostDispatch(self.cfg)
        self.graphed = GraphedSparseAttention()
        self.graphed_upkeep = GraphedUpkeep()
        self.dp_group = (pg_collection.dp_cp if pg_collection is not None and hasattr(pg_collection, "dp_cp")
                         else parallel_state.get_data_parallel_group(with_context_parallel=True)
                         if parallel_state.model_parallel_is_initialized() else None)
        self.cp = None
        if config.context_parallel_size > 1 and self.cfg.coarse_remainder:
            raise NotImplementedError("DSVConfig.coarse_remainder does not support context parallelism")
        if config.context_parallel_size > 1:
            cp_group = (pg_collection.cp if pg_collection is not None and hasattr(pg_collection, "cp")
                        else parallel_state.get_context_parallel_group())
            self.cp = LayerContextParallel(self.cfg, self.heads, self.head_dim, cp_group,
                                           dist.get_process_group_ranks(cp_group))
            self.cp.group.label = f"DSVDotProductAttention (layer {self.layer_number})"
        self.last_used_sparse = False
        self.last_n_kv = None
        self.in_step_graph = False  # set while a whole training step is captured (step_graph.capturing)
        self.warm_up_pass = False   # ... in the capture's warm-up pass, which is no training step
        self.step_plan = None       # that step's decisions, fixed when it began (plan_step)
        self.device_budgets = DeviceBudgets()   # what a training step's selection reads
        self.recall_budgets = DeviceBudgets()   # what a profile's own selection reads (_learn)
        self.last_training_call = None   # (shape, dtype, device, packed) of the last training step's q [s, b, n, d]
        self.graph_stats = None     # the predictor loss and profile a captured step computes (its tensors)
        self.last_costs = None  # measured attention fwd+bwd ms at the last shape: dense, and sparse at its density
        self._pending = None  # update staged in backward, committed when the backward pass ends

    # ---------------------------------------------------------------- forward
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        cfg, cp = self.cfg, self.cp
        query, key, value, fmt, q_seg, kv_seg = self._inputs(query, key, value, attention_mask, attn_mask_type,
                                                             attention_bias, packed_seq_params,
                                                             shards=cp.size if cp else 1, cube=cfg.cube)
        if key.shape[0] != query.shape[0] or kv_seg != q_seg:
            raise ValueError(f"DSVDotProductAttention is self-attention: key has {key.shape[0]} tokens, "
                             f"query {query.shape[0]} (packed: {kv_seg} vs {q_seg})")
        if cfg.dispatch == "measured":   # raises where it cannot measure: now, not at the first stage-2 step
            self.dispatch.measured(query.device, cp is not None)
        packing = segments = None
        if q_seg is not None:
            align = max(cfg.block_q, cfg.block_kv)
            packing = block_aligned(q_seg, align)
            if cp is not None and not packing.identity:
                raise ValueError(f"DSVDotProductAttention: with context parallelism packed clips must start at "
                                 f"multiples of max(block_q, block_kv)={align} (cu_seqlens_q_padded, or "
                                 f"megatron_dsv.video.PackedClips(align={align})): a rank holds only its share "
                                 f"and cannot realign them; got starts {list(q_seg.starts)}")
            query, key, value = (packing.to_blocks(t) for t in (query, key, value))
            segments = packing.dst
        training_step = self.training and torch.is_grad_enabled() and query.requires_grad
        if self.in_step_graph:
            n_kv, budgets, sparse, learn, step = self._planned(query, training_step)
        else:
            # In training the decisions follow the step counter: made in traced code, torch.compile would
            # guard on the counter and recompile every step, so there they are made outside the graph (one
            # graph break; a step run inside step_graph.capturing has none).
            decide = self._decide_outside_graph if training_step else self._decide
            n_kv, budgets, sparse, learn, step = decide(query, key, value, segments, training_step)
        self.last_n_kv, self.last_used_sparse = n_kv, sparse
        if training_step:
            self.last_training_call = (tuple(query.shape), query.dtype, query.device, segments is not None)
        # (heads or None for all, queries, keys of the whole sequence, selection or None, first query token)
        learn_inputs = None
        if cp is not None:
            # (a collective that timed out or lost a peer: say which layer waited)
            with failures_named(f"DSVDotProductAttention (layer {self.layer_number}): context-parallel attention "
                                "failed"):
                cp.check_shard(query, f"DSVDotProductAttention (layer {self.layer_number})", segments,
                               (self.controller.host()["stage"], step, sparse, learn))
                with self.timer("attention", query.device):
                    if sparse:
                        out = cp.sparse(query, key, value, self.predictor, budgets, self.softmax_scale,
                                        step, segments, self.deterministic)
                        learn_inputs = cp.learn_inputs(query, key) if learn else None
                    else:
                        out, learn_inputs = cp.dense(query, key, value, self.softmax_scale, learn, segments)
        elif (sparse and training_step and not learn and segments is None and self.cfg.cuda_graphs
              and not self.in_step_graph and not torch.compiler.is_compiling() and self.graphed.fits(query)):   # (compile: mode="reduce-overhead")
            with self.timer("attention", query.device):  # selection included: one replay
                out = self._graphed_sparse(query, key, value)
        elif sparse:
            if training_step and segments is None:   # the budgets _decide_at placed on the device
                budgets = self.device_budgets
            with self.timer("selection", query.device):
                selection = self._select(query.detach(), key.detach(), budgets, segments=segments,
                                         cached_weights=not self.in_step_graph)
            with self.timer("attention", query.device):
                out = self._sparse_attention(query, key, value, selection, segments)
            learn_inputs = (None, query.detach(), key.detach(), selection, 0) if learn else None
        else:
            with self.timer("attention", query.device):
                out = dense_attention(query, key, value, scale=self.softmax_scale, layout="sbhd", segments=segments)
            learn_inputs = (None, query.detach(), key.detach(), None, 0) if learn else None
        if training_step and out.requires_grad and (learn or not self.in_step_graph):
            # The bookkeeping runs in backward: exactly once per training step per layer, also under
            # activation recomputation (reentrant: the first, no-grad pass builds no graph and only
            # the recomputed pass is differentiated; non-reentrant: the recomputed pass is never
            # differentiated), and never in evaluation. In a captured step the predictor's loss, gradients
            # and (dense steps) Adam step are computed there; step_graph.replayed records the rest.
            out = OnBackward.apply(out, lambda: self._learn(learn_inputs, segments, read_predictor=sparse))
        if packing is not None:
            out = packing.from_blocks(out)
        return self._output(out, fmt)

    def _decide(self, query, key, value, segments, training_step: bool):
        """This call's (KV blocks, per-head budgets (None where it runs dense), whether it runs sparse,
        whether it trains the predictor or profiles, the step), from the controller's host state."""
        return self._decide_at(tuple(query.shape), query.dtype, query.device, segments, training_step,
                               lambda: (query, key, value))

    @torch.compiler.disable
    def _decide_outside_graph(self, query, key, value, segments, training_step: bool):
        return self._decide(query, key, value, segments, training_step)

    def _decide_at(self, shape, dtype, device, segments, training_step: bool, tensors):
        """_decide for q of this shape, dtype and device; tensors() gives q, k, v where a kernel time must
        be measured."""
        cfg, ctl, cp = self.cfg, self.controller, self.cp
        n_kv = (math.ceil(shape[0] * (cp.size if cp else 1) / cfg.block_kv) if segments is None else
                work_weighted_blocks(segments, cfg.block_kv))
        sparse = self._sparse_now(shape, dtype, device, n_kv, segments, tensors)
        budgets = None   # only a sparse call reads them
        if sparse:
            budgets = ctl.budgets(n_kv) if segments is None else self._clip_budgets(segments)
        if sparse and training_step and segments is None and cp is None:
            self.device_budgets.hold(budgets, n_kv, device, annealing=ctl.annealing())
        learn = training_step and ctl.learns_now()
        return n_kv, budgets, sparse, learn, ctl.host()["step"]

    def plan_step(self) -> Optional[StepPlan]:
        """Fix the next training step's decisions, at the shape of the layer's last training step (an
        evaluation in between, at any shape, changes nothing), and return them.
        A step that runs on them (step_graph.capturing) reads nothing of the host state: a CUDA graph
        captures it, and torch.compile traces one that does not learn (StepPlan.learns) with no guard on
        the step counter and no graph break.
        The budgets are not in the plan: the selection reads them from the device (device_budgets.py),
        so a graph replays, and a compiled graph runs, across budget changes of equal k_max.
        The budgets of a profile's own selection (stage 1, or a dense layer in stage 2) are placed on the
        device here too (recall_budgets), before the step's kernels are queued.
        None where the step cannot run planned: a layer that has not trained yet; packed clips; context
        parallelism."""
        plan = None   # (step_plan is set once: a module's attribute assignment is host time before every replay)
        if self.last_training_call is not None and not self.last_training_call[3] and self.cp is None:
            plan = self._plan(*self.last_training_call[:3])
        self.step_plan = plan
        return plan

    def _plan(self, shape, dtype, device) -> StepPlan:
        """plan_step's decisions for a training step of q at this shape, dtype and device."""

        def tensors():   # only where this shape's kernel times are not measured yet: values play no part
            return tuple(torch.randn(shape, dtype=dtype, device=device) for _ in range(3))

        n_kv, _, sparse, learn, _ = self._decide_at(shape, dtype, device, None, True, tensors)
        ctl = self.controller
        profile = learn and ctl.profile_now()
        recall_k_max = None
        if profile and not sparse:
            self.recall_budgets.hold(ctl.budgets(n_kv), n_kv, device)
            recall_k_max = self.recall_budgets.k_max
        # A step that trains the predictor samples a number of rows that may differ from step to step (their
        # values follow the device's step counter).
        return StepPlan(shape, ctl.host()["stage"], n_kv, sparse, self.next_sample_size() if learn else None,
                        self.device_budgets.k_max if sparse else None, profile, recall_k_max)

    def _planned(self, query, training_step: bool) -> tuple:
        """The decisions plan_step fixed, as _decide gives them (no step: context parallelism is excluded)."""
        plan = self.step_plan
        if plan is None or plan.shape != tuple(query.shape) or not training_step:
            raise ValueError(f"DSVDotProductAttention (layer {self.layer_number}): inside step_graph.capturing a "
                             f"forward is the training step planned on entry, q of shape "
                             f"{None if plan is None else plan.shape}; got {tuple(query.shape)}"
                             f"{'' if training_step else ' outside a training step (no grad or eval mode)'}")
        return plan.n_kv, self.device_budgets.values, plan.sparse, plan.learns, None

    def _sparse_now(self, shape, dtype, device, n_kv: int, segments, tensors) -> bool:
        """Stage 2, a layer its policy lets run sparse, and sparse predicted faster than dense at this
        shape and mean budget (measured once per shape on the GPU, on tensors() = q, k, v; packed clips
        and context parallelism use the density rule)."""
        ctl = self.controller
        if not ctl.may_run_sparse():
            return False
        density = sum(ctl.budgets(n_kv)) / (self.heads * n_kv)
        if segments is not None or not self.dispatch.measured(device, self.cp is not None):
            return self.dispatch.sparse_pays(density)
        cfg = self.cfg
        s, b, heads, d = shape
        shape = (s, b, heads, d, dtype, cfg.block_q, cfg.block_kv, cfg.rank, cfg.estimator, cfg.coarse_remainder)

        def select(q_, k_, share):
            return self._select(q_, k_, [max(1, round(share * n_kv))] * heads)

        def dense(q_, k_, v_):
            return dense_attention(q_, k_, v_, scale=self.softmax_scale, layout="sbhd")

        pays = self.dispatch.sparse_pays(density, shape, lambda: measure_costs(
            *tensors(), select=select, attend=self._sparse_attention, dense=dense))
        costs = self.dispatch.costs(shape)
        self.last_costs = {"dense_ms": costs.dense_ms, "sparse_ms": costs.sparse_ms(density), "density": density}
        return pays

    def _graphed_sparse(self, q, k, v):
        """Selection + block-sparse attention replayed from this layer's CUDA graphs (graphed.py), at the
        budgets device_budgets holds."""
        pred, budgets = self.predictor, self.device_budgets
        key = (budgets.k_max, budgets.tensor.data_ptr(), *(tuple(t.shape) + t.stride() for t in (q, k, v)),
               q.dtype, pred.wq.data_ptr(), pred.wk.data_ptr())

        def fn(q_, k_, v_):
            return self._sparse_attention(q_, k_, v_, self._select(q_.detach(), k_.detach(), budgets,
                                                                   cached_weights=False))

        return self.graphed(key, fn, q, k, v)

    def _sparse_attention(self, q, k, v, selection, segments=None):
        """Block-sparse attention of [s, b, n, d] q, k, v over `selection`, with the unselected blocks
        added back pooled when cfg.coarse_remainder is set."""
        cfg = self.cfg
        opts = dict(block_q=cfg.block_q, block_kv=cfg.block_kv, scale=self.softmax_scale, layout="sbhd")
        kernel = dict(backend=cfg.backend, deterministic=self.deterministic)
        if not cfg.coarse_remainder:
            return block_sparse_attention(q, k, v, *selection, segments=segments, **kernel, **opts)
        if segments is not None:
            raise NotImplementedError("DSVConfig.coarse_remainder does not support packed clips (packed_seq_params)")
        out, lse = block_sparse_attention(q, k, v, *selection, return_lse=True, **kernel, **opts)
        return coarse_remainder(q, k, v, *selection, out, lse, **opts)

    def _clip_budgets(self, segments) -> torch.Tensor:
        """Per-(head, clip) budgets [heads, clips] of packed clips: k_h = ceil((1 - s_h) x clip KV blocks)."""
        return torch.tensor([self.controller.budgets(n) for n in segments.blocks_per_clip(self.cfg.block_kv)]).T

    @property
    def _kv_reduce(self) -> str:
        """How the estimator scores a KV block: the learned predictor by its best token ("max"), the
        pooled baseline by the block's mean key ("mean")."""
        return "max" if self.cfg.estimator == "lowrank" else "mean"

    def _select(self, q, k, budgets, heads=None, segments=None, q_start=0, cached_weights=True):
        """Block selection for [s, b, n, d] q and [S, b, n, d] k (detached) of `heads` (default all),
        with their budgets (a list of ints; an int tensor [heads, clips] for packed clips, where q may
        then be the tokens [q_start, q_start + s) of the packing, one CP rank's share; or DeviceBudgets
        holding those of `heads`).
        cached_weights=False casts the predictor's weights in place of reusing a cast copy (inside a
        CUDA graph, which must read the live parameters)."""
        q_lr, k_lr = q, k
        if self.cfg.estimator == "lowrank":
            q_lr = self.predictor.project(q, "q", heads, cached=cached_weights)
            k_lr = self.predictor.project(k, "k", heads, cached=cached_weights)
        k_max = None
        if isinstance(budgets, DeviceBudgets):
            budgets, k_max = budgets.tensor, budgets.k_max
        return select_blocks(q_lr.transpose(0, 1), k_lr.transpose(0, 1), budgets, k_max=k_max,
                             block_q=self.cfg.block_q, block_kv=self.cfg.block_kv,
                             backend=self.cfg.backend, kv_reduce=self._kv_reduce, segments=segments,
                             q_start=q_start if segments is not None else 0)

    # ------------------------------------------------------ DSV bookkeeping
    @torch.no_grad()
    def _learn(self, learn_inputs, segments=None, read_predictor=False):
        """One training step of DSV bookkeeping (runs in backward). With learn_inputs = (heads, q, k,
        selection, q_start): predictor loss/gradients and profile on sampled rows of q [s, b, n, d]
        (tokens from q_start on) against the keys k [S, b, n, d] of the whole sequence (of the row's
        clip, for packed `segments`) of `heads` (None: all of this rank's heads); with None, only
        the step count advances. read_predictor: the forward selected with the predictor (it ran sparse).

        Where the forward ran dense (all of stage 1), the predictor's Adam step runs here, where its
        gradients are made (_update): in a graph of the training work (without replicas to reduce over
        first), or of the whole step, it is one more node, not ~0.1 ms of host time per layer after the
        replay, and a recomputation of the forward (non-reentrant checkpointing reruns it after this
        hook) reads no predictor. Where it selected with the predictor, the step waits for the end of
        the backward, so a recomputed forward selects exactly the blocks the first one did. The rest
        (loss EMA, profile EMAs, step count, stage) is staged here and committed when the backward pass
        ends, so budgets and stage stay fixed within one training step. A layer that ran more than once
        before this backward learns at its first call here only: one training step, one update.
        """
        torch.autograd.Variable._execution_engine.queue_callback(
            functools.partial(self._backward_done, None if learn_inputs is None else learn_inputs[1].device))
        if (self.graph_stats if self.in_step_graph else self._pending) is not None:   # staged in this backward
            return
        if learn_inputs is None:
            self._pending = {}
            return
        some_heads, q, k, selection, q_start = learn_inputs
        ctl, cfg = self.controller, self.cfg
        heads = list(range(self.heads)) if some_heads is None else list(some_heads)
        train = cfg.estimator == "lowrank" and ctl.train_predictor_now()
        profile = ctl.profile_now()
        if profile and selection is None:  # what the predictor picks now (recall in stage 1, or under CP)
            if segments is None:
                # The profile picks its sampled cubes' blocks itself (_profile_rows), at budgets held on the
                # device (copied in place when they change; a captured step finds them held: plan_step).
                n_kv = math.ceil(k.shape[0] / cfg.block_kv)
                budgets = ctl.budgets(n_kv)
                self.recall_budgets.hold([budgets[h] for h in heads], n_kv, q.device)
                selection = self.recall_budgets
            else:
                # some_heads None (all heads): the weights as they are; indexing them by a host list would
                # copy it to the device, which a captured step cannot.
                selection = self._select(q, k, self._clip_budgets(segments)[heads], some_heads, segments, q_start,
                                         cached_weights=not self.in_step_graph)
        plain = train and not profile and some_heads is None and segments is None and q_start == 0
        with upkeep_stream.aside(q.device, (q, k, selection)):   # beside the rest of the backward (upkeep_stream.py)
            if (plain and self.cfg.cuda_graphs and not self.in_step_graph and not torch.compiler.is_compiling()
                    and self.graphed_upkeep.fits(q) and self.controller.step.device == q.device):
                stats = self._graphed_rows_step(q, k, heads)
            else:
                stats = self._update(self._sampled_rows_step(q, k, heads, selection if profile else None, train,
                                                             segments, q_start), now=not read_predictor)
        if self.in_step_graph:
            self.graph_stats = stats
        else:
            self._pending = stats

    def _backward_done(self, device) -> None:
        """At the end of the backward pass: wait for the upkeep queued aside on `device` (None: none), then
        commit what _learn staged (a captured step's is committed after each replay)."""
        if device is not None:
            upkeep_stream.join(device)
        if not self.in_step_graph:
            self.commit()

    def _graphed_rows_step(self, q, k, heads: list) -> dict:
        """_update(_sampled_rows_step(...)) at a plain eager training step (all heads, one sequence, no
        profile), replayed from this layer's CUDA graph (graphed_upkeep.py). A layer with replicas (data
        or tensor parallel) reduces over them between the graph's loss and gradients and the Adam step:
        the graph holds no collective, so it runs on any process group. heads: all of them."""
        pred = self.predictor
        local = not self._has_replicas()
        key = (tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), q.dtype,
               self._sample_plan(0, q.shape[0], 0, k.shape[0]), pred.wq.data_ptr(), pred.wk.data_ptr(),
               self.controller.step.data_ptr(), local, self.controller.predictor_lr())

        def rows_step(q_, k_):   # (a plain step is a stage-1 step: its forward ran dense)
            stats = self._sampled_rows_step(q_, k_, heads, None, True)
            return self._update(stats, now=True) if local else stats

        stats = self.graphed_upkeep(key, rows_step, q, k)
        return stats if local else self._update(stats, now=True)

    def _update(self, stats: dict, now: bool) -> dict:
        """Reduce `stats` over the replicas (_reduce_replicas); with `now`, take the predictor's Adam step on
        their gradients, if they hold any (they then leave `stats`; else commit takes the step). Returns
        `stats` for commit."""
        self._reduce_replicas(stats)
        if now and "grad_q" in stats:
            grads = stats.pop("grad_q"), stats.pop("grad_k")
            if not self.warm_up_pass:
                self.predictor.apply_grads(*grads, self.controller.predictor_lr())
        return stats

    def commit(self) -> None:
        """Apply the update staged by the last backward: loss, profile, step count (and a sparse step's
        predictor update).
        Runs at the end of the backward pass; also before a state_dict is taken or metrics read
        (where there is mostly nothing to apply: that case costs no more than the check)."""
        self.graphed.in_flight = False  # the backward pass is over: a replayed forward it skipped is dropped
        if self._pending is not None:
            stats, self._pending = self._pending, None
            self._commit_stats(stats)

    @torch.no_grad()
    def _commit_stats(self, stats: dict) -> None:
        ctl = self.controller
        if "grad_q" in stats:   # the forward selected with the predictor: its update waited for this (_learn)
            self.predictor.apply_grads(stats["grad_q"], stats["grad_k"], ctl.predictor_lr())
        if "loss" in stats:   # the predictor trained (a replayed update ran without the host)
            ctl.record_loss(stats["loss"])
            self.predictor.weights_updated()
        if "recall" in stats:
            ctl.record_profile(stats)
        ctl.end_step()
        if ctl.in_stage2:   # stage 2 trains the predictor only at profile steps, which run eagerly
            self.graphed_upkeep.release()

    def replayed(self, stats: Optional[dict]) -> None:
        """The bookkeeping of a training step replayed from a step graph: commit what an eager pass left,
        then the loss and profile the replay computed (`stats`, what the capture left in graph_stats; the
        replay took the predictor's Adam step where the step ran dense, else the gradients are here), or
        with None only the step count."""
        self.commit()
        self._pending = stats if stats is not None else {}
        self.commit()

    def _save_to_state_dict(self, *args, **kwargs):
        self.commit()
        super()._save_to_state_dict(*args, **kwargs)

    def _sample_plan(self, first: int, n: int, start: int, length: int) -> tuple:
        """(stride, the part's first cube, sampled cubes, sampled rows) of the queries [first, first + n)
        of a sequence (clip) at [start, start + length) at this step: every stride-th query block
        (cube), counted from the sequence start, rotating every step."""
        block_q = self.cfg.block_q
        stride = min(self.cfg.sample_stride, math.ceil(length / block_q))
        b0 = (first - start) // block_q   # parts start on query-block boundaries
        b1 = math.ceil((first + n - start) / block_q)
        c0 = b0 + (self.controller.host()["step"] - b0) % stride
        cubes = len(range(c0, max(c0, b1), stride))
        last = c0 - b0 + (cubes - 1) * stride   # the last sampled cube, relative: the only one that may be partial
        rows = (cubes - 1) * block_q + min(block_q, n - last * block_q) if cubes else 0
        return stride, b0, cubes, rows

    def next_sample_size(self) -> int:
        """How many rows the next training step samples, at the last training step's length (one unpacked
        sequence, no context parallelism): what a step graph's key holds of the predictor's training."""
        tokens = self.last_training_call[0][0]
        return self._sample_plan(0, tokens, 0, tokens)[3]

    def _sampled_rows(self, first: int, n: int, start: int, length: int, device) -> torch.Tensor:
        """Sampled rows of the queries [first, first + n) of a sequence (clip) at [start, start + length),
        relative to `first` (see _sample_plan). Whole cubes are sampled: one selection serves all rows of
        a cube, so the profile that sets its budget must see the cube's rows together. Counting from the
        sequence start makes CP ranks holding parts of a sequence sample exactly what one process would.
        The host knows how many rows; their values come from the controller's device step counter, so
        a step replayed from a CUDA graph samples the rows an eager step would (and nothing is copied
        from the host)."""
        block_q = self.cfg.block_q
        stride, b0, cubes, rows = self._sample_plan(first, n, start, length)
        c0 = torch.remainder(self.controller.step.to(device) - b0, stride)   # first sampled cube, relative
        offsets = torch.arange(cubes, device=device) * (stride * block_q) + c0 * block_q
        return (offsets[:, None] + torch.arange(block_q, device=device)).flatten()[:rows]

    def _sampled_rows_step(self, q, k, heads, selection, train, segments=None, q_start=0):
        """The predictor loss (if train) and the profile (if selection is given) of the sampled rows of q
        against all keys of their sequence (each clip's own, for packed `segments`, where q holds tokens
        [q_start, q_start + s)). selection: (kv_idx, kv_cnt) of every query block of q, or (one unpacked
        sequence) the DeviceBudgets at which the profile selects the sampled cubes itself. The loss needs
        no logits (LowRankPredictor.gram_loss); the profile needs the rows' block masses and a few rows'
        logits (_profile_rows). Every statistic is a mean over the sampled rows of all clips.

        Returns per-head tensors over all of this rank's heads, zero where a head is not in
        `heads`: sums over the sampled rows of the predictor loss and its gradients (if train) and
        of the profile (if selection is given), and their "count" of rows (means once reduced).
        """
        cfg, H = self.cfg, self.heads
        device = q.device
        # (first query, queries, first key, keys) of each sequence's part in q (tokens q_start on, one CP
        # rank's part of the sequence or all of it); k holds the whole sequence.
        pieces = (((q_start, q.shape[0], 0, k.shape[0]),) if segments is None else
                  segments.window(q_start, q_start + q.shape[0]))
        clips = [(first - q_start, n, start, length) for first, n, start, length in pieces]
        clip_rows = [self._sampled_rows(*piece, device) for piece in pieces]
        total_rows = sum(rows.numel() for rows in clip_rows)
        # All heads (no context parallelism): the weights themselves, no index from the host (a captured
        # step may hold no host copies).
        idx = None if heads == list(range(H)) else _to_device(torch.tensor(heads), device)
        wq, wk = (w.detach().float() if idx is None else w.detach().float()[idx]
                  for w in (self.predictor.wq, self.predictor.wk))
        local = {"profiled": torch.zeros(len(heads), PROFILE_COLUMNS, device=device)}
        for (q0, _, k0, n_k), rows in zip(clips, clip_rows):
            if not rows.numel():  # a part of a clip too short to hold a sampled cube
                continue
            weight = rows.numel()  # per-row means -> sums over rows
            positions = q0 + rows                                 # the rows' tokens in q
            q_sampled = q[positions]                              # [n_rows, b, n, d]
            keys = k[k0:k0 + n_k]                                 # [S, b, n, d]
            if train:  # the loss from the keys' Gram matrices: no [b, h, rows, S] logits (predictor.py)
                # [n, b, n_rows, d], float32 in that order: what gram_loss multiplies as it is
                q_rows = q_sampled.permute(2, 1, 0, 3).to(torch.float32, memory_format=torch.contiguous_format)
                # sums over rows; the gradient scale of a mean over all heads
                loss, grad_q, grad_k = LowRankPredictor.gram_loss(
                    q_rows, key_gram(keys), wq, wk, self.softmax_scale, cfg.loss_cos_weight, grad_scale=weight / H,
                    backend=cfg.backend)
                for name, val in (("loss", loss * weight), ("grad_q", grad_q), ("grad_k", grad_k)):
                    local[name] = local[name] + val if name in local else val
            if selection is not None:
                rows_selection = (selection if isinstance(selection, DeviceBudgets) else
                                  tuple(t.index_select(2, positions // cfg.block_q) for t in selection))
                # Sparsities are those of this piece's cubes; pieces, ranks and replicas average them by rows.
                local["profiled"] += self._profile_rows(q_sampled, keys, wq, wk, rows_selection,
                                                        k0 // cfg.block_kv) * weight

        def full(x):
            if idx is None:
                return x.float()
            out = torch.zeros((H, *x.shape[1:]), device=device, dtype=torch.float32)
            return out.index_copy_(0, idx, x.float())

        stats = {"count": full(torch.full((len(heads),), float(total_rows), device=device))}
        if train:  # (zero where no part of a clip held a sampled cube)
            shapes = {"loss": (len(heads),), "grad_q": wq.shape, "grad_k": wk.shape}
            stats.update({name: full(local[name] if name in local else torch.zeros(shape, device=device))
                          for name, shape in shapes.items()})
        if selection is not None:
            stats.update(split_profiled(full(local["profiled"])))
        return stats

    def _profile_rows(self, q_rows, keys, wq, wk, selection, kv0: int) -> torch.Tensor:
        """Profile of one clip's sampled rows q_rows [rows, b, n, d] (whole cubes, in order) against its
        keys [S, b, n, d]: [n, PROFILE_COLUMNS], means over the rows (profiled_columns). selection: (kv_idx,
        kv_cnt) [b, n, rows, ...] of each row's query block, or DeviceBudgets: the estimator's top blocks of
        each cube at those budgets (stage 1: what the selection would pick, from the scores computed here
        anyway; selecting the cubes through select_blocks took 0.1 ms per layer at 16k on the H200, latency
        bound on 4 query blocks; these scores are float32 matmuls, in TF32 where torch allows it, where
        the selection kernel multiplies in tf32x3); kv0 the clip's first KV block. The rows' block masses
        come from row_block_mass (on the GPU without their logits in memory), the token sparsity's few
        rows' from their logits: both a few heads at a time (LOGIT_CHUNK_BYTES)."""
        cfg = self.cfg
        n_rows, b, heads, _ = q_rows.shape
        # What the estimator sees: the predictor's projections as the selection computes them (in the
        # layer's dtype), or q and k themselves (pooled estimator).
        q_est, k_est = q_rows.transpose(0, 1), keys.transpose(0, 1)
        if cfg.estimator == "lowrank":
            q_est = torch.einsum("nbhd,hdr->bnhr", q_rows, wq.to(q_rows.dtype))
            k_est = torch.einsum("sbhd,hdr->bshr", keys, wk.to(keys.dtype))
        cube_scores = self._cube_scores(q_est, k_est)
        if isinstance(selection, DeviceBudgets):
            cubes = topk_blocks(cube_scores, selection.tensor, selection.k_max)
            cube_of_row = torch.arange(n_rows, device=q_rows.device) // cfg.block_q
            selection = tuple(t.index_select(2, cube_of_row) for t in cubes)
        kv_idx, kv_cnt = selection
        if kv0:
            kv_idx = kv_idx - kv0  # ids within the clip, as the mass has them
        token_q = q_rows[token_rows(n_rows, cfg.block_q)]
        n_kv = -(-keys.shape[0] // cfg.block_kv)
        per_chunk = max(1, LOGIT_CHUNK_BYTES // (4 * b * (token_q.shape[0] * keys.shape[0] + n_rows * n_kv)))
        columns = []
        for h0 in range(0, heads, per_chunk):
            hs = slice(h0, h0 + per_chunk)
            mass = row_block_mass(q_rows[:, :, hs], keys[:, :, hs], scale=self.softmax_scale, block_kv=cfg.block_kv,
                                  backend=cfg.backend)
            token_logits = row_logits(token_q[:, :, hs], keys[:, :, hs]) * self.softmax_scale
            prof = profile_mass(mass, token_logits, block_q=cfg.block_q, theta=cfg.theta,
                                cube_scores=cube_scores[:, hs])
            recall = selection_recall(mass, kv_idx[:, hs], kv_cnt[:, hs])
            columns.append(profiled_columns({**prof._asdict(), "recall": recall}))
        return torch.cat(columns) if len(columns) > 1 else columns[0]

    def _cube_scores(self, q_est, k_est) -> torch.Tensor:
        """The estimator's block scores [b, n, cubes, n_kv] of sampled rows q_est [b, rows, n, r] (whole
        cubes, in order) against keys k_est [b, S, n, r]: what the selection ranks blocks by."""
        return block_scores_reference(q_est, k_est, block_q=self.cfg.block_q, block_kv=self.cfg.block_kv,
                                      kv_reduce=self._kv_reduce)

    def _has_replicas(self) -> bool:
        """Whether _reduce_replicas reduces over other ranks (data or tensor parallel)."""
        return _group_size(self.dp_group) > 1 or _group_size(self.tp_group) > 1

    def _reduce_replicas(self, stats: dict) -> None:
        """Average every per-head tensor over all sampled rows of the ranks that measured that head:
        data-parallel replicas and context-parallel ranks (one all-reduce of the sums and row
        counts), so every replica's predictor and schedule stay identical. The loss is also averaged over TP ranks so all ranks of a layer
        switch stage together."""
        if dist.is_initialized() and _group_size(self.dp_group) > 1:
            keys = list(stats)
            flat = torch.cat([stats[key].reshape(-1) for key in keys])
            # (a replica that timed out or was lost: say which layer's backward waited)
            with failures_named(f"DSVDotProductAttention (layer {self.layer_number}): the predictor's all-reduce "
                                "over its data- and context-parallel replicas failed"):
                dist.all_reduce(flat, group=self.dp_group)
            for key, part in zip(keys, flat.split([stats[key].numel() for key in keys])):
                stats[key] = part.view_as(stats[key])
        count = stats.pop("count")
        for key, val in stats.items():
            stats[key] = val / count.view(-1, *([1] * (val.dim() - 1)))
        if "loss" in stats:
            stats["loss"] = stats["loss"].mean()
            if _group_size(self.tp_group) > 1:
                dist.all_reduce(stats["loss"], group=self.tp_group)
                stats["loss"] /= _group_size(self.tp_group)

    # ----------------------------------------------------------- checkpoints
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Per-head tensors (predictor weights, Adam moments, profiled EMAs) are sharded over TP
        along the head axis; scalars (stage, step, loss EMA) are replicated."""
        state = self.state_dict(prefix="", keep_vars=True)
        per_head = [key for key, t in state.items() if t.dim() >= 1 and t.shape[0] == self.heads]
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {key: 0 for key in per_head}, sharded_offsets,
            tp_group=self.tp_group if self.tp_group is not None else None,
            dp_cp_group=(metadata or {}).get("dp_cp_group", self.dp_group),
        )

    # ---------------------------------------------------------- observability
    def metrics(self) -> dict:
        """Stage, schedule and profile of this layer, plus forward time in selection vs attention."""
        self.commit()
        ctl = self.controller
        host = ctl.host()
        n_kv = self.last_n_kv
        budgets = ctl.budgets(n_kv) if n_kv else []
        return {
            "layer": self.layer_number,
            "stage": host["stage"],
            "step": host["step"],
            "sparse": self.last_used_sparse,
            "predictor_loss": host["loss_ema"],
            # From the host mirror: reading the metrics every step costs no device syncs.
            **{name: host[name] for name in PER_HEAD_BUFFERS},
            # Share of KV blocks each head attends to in stage 2 (after floor and ceiling), and the
            # share of its attention mass those blocks hold by its profiled mass curve.
            "budget_policy": self.cfg.budget_policy,
            "budget": [k / n_kv for k in budgets],
            "held_mass": ctl.held_mass(n_kv) if n_kv else [],
            "attention_cost": self.last_costs,
            **{f"{name}_ms": ms for name, ms in self.timer.read().items()},
        }
