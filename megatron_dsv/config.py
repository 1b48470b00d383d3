"""DSVConfig: every knob of DSV sparse attention, validated on construction.

The same fields are exposed as ``--dsv-*`` command line flags by
:func:`add_dsv_args` (usable as a Megatron ``extra_args_provider``) and read back
by :meth:`DSVConfig.from_args`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import textwrap
from dataclasses import dataclass
from typing import Optional, Tuple

ESTIMATORS = ("lowrank", "pooled")
BACKENDS = ("auto", "triton", "reference", "cudnn", "triton-one-recompute")
# Kernels whose backward is not bitwise reproducible (need deterministic_backward=False): cuDNN's
# (ops/cudnn_attention.BITWISE_REPRODUCIBLE, checked on the GPU by tests/test_cudnn_backend.py) and
# the one-recompute schedule's (dq by float32 atomics).
NON_REPRODUCIBLE_BACKENDS = ("cudnn", "triton-one-recompute")
BUDGET_POLICIES = ("theta", "target", "uniform")
BUDGET_SCOPES = ("layer", "model")
DISPATCHES = ("auto", "measured", "density")
CP_PLAN_SEARCHES = ("auto", "measured", "model")
BLOCK_SIZES = (16, 32, 64, 128)


@dataclass
class DSVConfig:
    """Configuration of DSV dynamic sparse attention.

    Budgets and sparsities are fractions of KV blocks. Step counts are counted in
    training steps of the layer (one forward+backward of a micro-batch).
    """

    # Predictor and selection.
    rank: int = 32
    """Rank r of the per-head low-rank predictor (q_lr = q @ Wq[h], k_lr = k @ Wk[h])."""
    # 32, not 16: in the small example (head dim 64) rank 16's predictor loss stalled at 0.10-0.23
    # and 1 of 8 layers went sparse; rank 32 reached 0.02-0.08 with 3 sparse layers at the same
    # validation loss (bench/results/quality_h100, H100). Selection cost grows with r but stays a
    # few percent of the sparse step.
    block_q: int = 64
    """Query block size in tokens: one 3D cube, one selection."""
    block_kv: int = 64
    """KV block size in tokens: the unit of selection."""
    cube: Tuple[int, int, int] = (4, 4, 4)
    """Cube shape (t, h, w) in latent tokens; t*h*w must equal block_q."""
    estimator: str = "lowrank"
    """'lowrank': DSV's learned predictor; 'pooled': mean-pooled q and k per block (baseline)."""

    # Profiler.
    theta: float = 0.9
    """Attention mass a head's critical set must hold (sparsity = share of blocks outside it)."""
    ema_alpha: float = 0.9
    """EMA weight of the old value when smoothing profiled sparsity (a profile that needs more blocks
    than the smoothed budget raises it at once)."""
    sample_stride: int = 64
    """Every sample_stride-th query block (all its rows) is sampled for the predictor loss and profiler."""

    # Two-stage schedule.
    loss_threshold: float = 0.01
    """Stage 1 ends when the predictor loss falls below this ..."""
    stage1_min_steps: int = 50
    """... but not before this many steps ..."""
    stage1_max_steps: int = 1000
    """... and at the latest after this many steps."""

    # Budgets (layers/budget.py) and dispatch (layers/dispatch.py).
    budget_policy: str = "target"
    """'theta': each head keeps the blocks holding theta of the mass (the paper's rule); 'target': the
    layer attends target_density of its blocks, spread over heads by their profiled mass curves;
    'uniform': every head target_density of the blocks (VSA's top-k)."""
    budget_scope: str = "layer"
    """'target': spread each layer's blocks over its own heads ('layer'), or the blocks of all layers built
    from this config over all their heads ('model': concentrated layers give blocks to spread ones)."""
    target_density: float = 0.12
    """'target'/'uniform': share of the KV blocks the layer attends once annealed. 0.12 is the sparsest
    setting whose validation gap to dense stayed within 1% (small, 16k tokens, 1000 steps, H200: +0.68%
    over three seeds; 0.1 gave +1.50%), at about the same speed (README, "Measured results")."""
    anneal_steps: int = 200
    """'target'/'uniform': stage-2 steps over which the density goes from the theta rule's to target_density,
    along a line."""
    layer_sparsity_threshold: float = 0.5
    """'theta': a layer goes sparse in stage 2 only if its mean profiled sparsity is at least this."""
    budget_floor: float = 0.05
    """Smallest per-head budget (fraction of KV blocks; at least one block)."""
    budget_ceiling: float = 1.0
    """Largest per-head budget (fraction of KV blocks)."""
    deterministic_backward: bool = False
    """True: bitwise reproducible sparse attention only (Triton's atomic-free kernels). False (as
    FlashAttention's and Transformer Engine's defaults): backend 'auto' may also pick cuDNN frontend's
    block-sparse kernels where installed and faster at the shape (their backward is not reproducible);
    without them it runs Triton's atomic-free kernels, untimed. Megatron's deterministic_mode and
    torch.use_deterministic_algorithms(True) force True."""
    coarse_remainder: bool = False
    """Add the unselected KV blocks back as pooled keys and values (one per block, logit offset by the log of
    its size), merged with the exact selected blocks in one softmax (ops/coarse.py; pure torch, memory
    [b, heads, S, n_kv]; not with packed clips or context parallelism)."""
    dispatch: str = "auto"
    """When a stage-2 layer runs sparse: 'measured' (selection + sparse attention timed against dense at
    the layer's shape once, on the GPU), 'density' (mean budget at most dense_fallback_density), or
    'auto' (measured where the Triton kernels run on CUDA without context parallelism, else density)."""
    dense_fallback_density: float = 0.65
    """Density rule: a sparse layer whose mean budget is denser than this computes dense attention instead."""
    profile_interval_stage1: int = 20
    """Profile sparsity every this many steps in stage 1 (the predictor trains every step). The profiles
    only set the budgets stage 2 begins from; a profile step reads true attention rows (111 ms
    against 104 ms for a stage-1 step of `small` at 16k, both replayed from step graphs, H200,
    bench/results/step_h200/s10/step_run2.json; 147 against 105 ms in s8): at 5, stage 1
    of a 1000-step run took 1.41x dense's time (75.4 s against 53.6 s, profile steps eager,
    bench/results/real_run_h200/e2e_final)."""
    profile_interval_stage2: int = 50
    """Profile and fine-tune the predictor every this many steps in stage 2."""
    predictor_lr: float = 1e-3
    """Adam learning rate of the predictor in stage 1."""
    stage2_lr_factor: float = 0.1
    """Stage 2 multiplies the predictor learning rate by this."""
    loss_cos_weight: float = 0.95
    """Predictor loss = w * cosine distance + (1 - w) * MSE of L2-normalised logit rows."""

    # Execution.
    backend: str = "auto"
    """Block-sparse attention kernels: 'auto' (on GPU the faster of Triton's and, where installed, allowed
    (deterministic_backward=False) and able to run the shape, cuDNN frontend's; reference elsewhere),
    'triton', 'cudnn', 'reference' or 'triton-one-recompute' (a backward that computes P once and adds dq
    with float32 atomics: not reproducible, and slower than 'triton' everywhere it was measured).
    Selection always runs our kernels (Triton on GPU)."""
    cuda_graphs: bool = True
    """Replay a stage-2 layer's selection + sparse attention (forward and backward), and a stage-1 layer's
    predictor training, from CUDA graphs when its query holds at most 2**25 elements: short sequences are
    bound by launch time (layers/graphed.py, layers/graphed_upkeep.py)."""
    cp_head_parallel_size: Optional[int] = None
    """Context parallel: U ranks for head all-to-all (None: chosen by the planner)."""
    cp_replan_interval: int = 100
    """Context parallel: re-plan heads and (U, R) every this many steps."""
    cp_plan_search: str = "auto"
    """Context parallel: how (U, schedule) is chosen. 'model': the cost model alone; 'measured': once per shape,
    the model's best plan of each (U, schedule) is timed on the layer's own inputs and the fastest pair kept
    (re-plans stay within it; cp/plan_search.py); 'auto': measured on CUDA, model elsewhere."""

    def __post_init__(self):
        if (not isinstance(self.cube, (tuple, list)) or len(self.cube) != 3
                or any(isinstance(c, bool) or not isinstance(c, int) for c in self.cube)):
            raise ValueError(f"DSVConfig.cube must be three positive ints (t, h, w), got {self.cube!r}")
        object.__setattr__(self, "cube", tuple(self.cube))
        self.validate()
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name, value):
        """A field set after construction is validated like one given to the constructor."""
        if not getattr(self, "_checked", False):
            return object.__setattr__(self, name, value)
        old = getattr(self, name)
        object.__setattr__(self, "_checked", False)
        try:
            object.__setattr__(self, name, value)
            self.__post_init__()
        except Exception:
            object.__setattr__(self, name, old)
            object.__setattr__(self, "_checked", True)
            raise

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        _int_in("rank", self.rank, 1, 256)
        _choice("block_q", self.block_q, BLOCK_SIZES)
        _choice("block_kv", self.block_kv, BLOCK_SIZES)
        if any(c < 1 for c in self.cube):
            raise ValueError(f"DSVConfig.cube must be three positive ints (t, h, w), got {self.cube}")
        if math.prod(self.cube) != self.block_q:
            raise ValueError(
                f"DSVConfig.cube {self.cube} holds {math.prod(self.cube)} tokens but block_q is "
                f"{self.block_q}: a query block is one cube, so t*h*w must equal block_q"
            )
        _choice("estimator", self.estimator, ESTIMATORS)
        _open_unit("theta", self.theta)
        _float_in("ema_alpha", self.ema_alpha, 0.0, 1.0, hi_open=True)
        _int_in("sample_stride", self.sample_stride, 1, 1 << 20)
        _float_in("loss_threshold", self.loss_threshold, 0.0, 2.0)
        _int_in("stage1_min_steps", self.stage1_min_steps, 0, 1 << 40)
        _int_in("stage1_max_steps", self.stage1_max_steps, self.stage1_min_steps, 1 << 40,
                lo_name="stage1_min_steps")
        _choice("budget_policy", self.budget_policy, BUDGET_POLICIES)
        _choice("budget_scope", self.budget_scope, BUDGET_SCOPES)
        if self.budget_scope == "model" and self.budget_policy != "target":
            raise ValueError(f"DSVConfig.budget_scope='model' spreads the 'target' policy's blocks over all layers; "
                             f"budget_policy={self.budget_policy!r} has nothing to spread (use budget_scope='layer')")
        _float_in("target_density", self.target_density, 0.0, 1.0, lo_open=True)
        _int_in("anneal_steps", self.anneal_steps, 0, 1 << 40)
        _float_in("layer_sparsity_threshold", self.layer_sparsity_threshold, 0.0, 1.0)
        _float_in("budget_floor", self.budget_floor, 0.0, 1.0)
        _float_in("budget_ceiling", self.budget_ceiling, self.budget_floor, 1.0, lo_name="budget_floor")
        if self.budget_ceiling <= 0:
            raise ValueError("DSVConfig.budget_ceiling must be > 0")
        if self.budget_policy != "theta" and not self.budget_floor <= self.target_density <= self.budget_ceiling:
            raise ValueError(
                f"DSVConfig.target_density={self.target_density} must lie in [budget_floor={self.budget_floor}, "
                f"budget_ceiling={self.budget_ceiling}] under budget_policy={self.budget_policy!r}: every head "
                "keeps between the floor and the ceiling, so the layer's share cannot reach the target")
        _choice("dispatch", self.dispatch, DISPATCHES)
        _float_in("dense_fallback_density", self.dense_fallback_density, 0.0, 1.0)
        _int_in("profile_interval_stage1", self.profile_interval_stage1, 1, 1 << 30)
        _int_in("profile_interval_stage2", self.profile_interval_stage2, 1, 1 << 30)
        _float_in("predictor_lr", self.predictor_lr, 0.0, 10.0, lo_open=True)
        _float_in("stage2_lr_factor", self.stage2_lr_factor, 0.0, 1.0)
        _float_in("loss_cos_weight", self.loss_cos_weight, 0.0, 1.0)
        _choice("backend", self.backend, BACKENDS)
        for name in ("cuda_graphs", "coarse_remainder", "deterministic_backward"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DSVConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.dispatch == "measured" and self.backend == "reference":
            raise ValueError("DSVConfig.dispatch='measured' times the GPU kernels, and DSVConfig.backend='reference' "
                             "runs none; use dispatch='density' or 'auto', or another backend")
        if self.deterministic_backward and self.backend in NON_REPRODUCIBLE_BACKENDS:
            raise ValueError(f"DSVConfig.backend={self.backend!r} is not bitwise reproducible and "
                             "DSVConfig.deterministic_backward=True asks for reproducible kernels; drop one")
        if self.cp_head_parallel_size is not None:
            _int_in("cp_head_parallel_size", self.cp_head_parallel_size, 1, 1 << 20)
        _int_in("cp_replan_interval", self.cp_replan_interval, 1, 1 << 30)
        _choice("cp_plan_search", self.cp_plan_search, CP_PLAN_SEARCHES)

    def replace(self, **changes) -> "DSVConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- arguments
    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DSVConfig":
        """Build from a namespace filled by :func:`add_dsv_args` (Megatron's ``get_args()``)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            dest = "dsv_" + f.name
            if hasattr(args, dest):
                kwargs[f.name] = getattr(args, dest)
        return cls(**kwargs)


def field_docs() -> dict:
    """{field: its docstring} of DSVConfig, read from the source (the one place the knobs are described)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(DSVConfig)))
    body = tree.body[0].body
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def add_dsv_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--dsv`` and ``--dsv-<field>`` flags; usable as Megatron's ``extra_args_provider``.
    Each flag's help is its field's docstring, with the default."""
    group = parser.add_argument_group(title="DSV sparse attention")
    group.add_argument("--dsv", action="store_true", help="Use DSV sparse self-attention.")
    docs = field_docs()
    for f in dataclasses.fields(DSVConfig):
        flag = "--dsv-" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helps = docs.get(f.name, "").replace("%", "%%") + " (default: %(default)s)"
        if f.name == "cube":
            group.add_argument(flag, type=int, nargs=3, default=list(default), metavar=("T", "H", "W"), help=helps)
        elif f.name in _CHOICES:
            group.add_argument(flag, type=str, default=default, choices=_CHOICES[f.name], help=helps)
        elif f.name in ("cuda_graphs", "coarse_remainder", "deterministic_backward"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps)
        elif f.name == "cp_head_parallel_size":
            group.add_argument(flag, type=int, default=default, help=helps)
        else:
            group.add_argument(flag, type=type(default), default=default, help=helps)
    return parser


_CHOICES = {"estimator": ESTIMATORS, "backend": BACKENDS, "budget_policy": BUDGET_POLICIES,
            "budget_scope": BUDGET_SCOPES, "dispatch": DISPATCHES, "cp_plan_search": CP_PLAN_SEARCHES}


# -------------------------------------------------------------------- helpers
def _int_in(name, value, lo, hi, lo_name=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"DSVConfig.{name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        lo_s = f"{lo_name}={lo}" if lo_name else str(lo)
        raise ValueError(f"DSVConfig.{name}={value} is out of range [{lo_s}, {hi}]")


def _float_in(name, value, lo, hi, lo_open=False, hi_open=False, lo_name=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"DSVConfig.{name} must be a number, got {value!r}")
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        lo_s = f"{lo_name}={lo}" if lo_name else str(lo)
        rng = ("(" if lo_open else "[") + f"{lo_s}, {hi}" + (")" if hi_open else "]")
        raise ValueError(f"DSVConfig.{name}={value} is out of range {rng}")


def _open_unit(name, value):
    _float_in(name, value, 0.0, 1.0, lo_open=True, hi_open=True)


def _choice(name, value, choices):
    # Types too: 64.0 == 64, but a float block size would crash the first forward.
    if value not in choices or type(value) is not type(choices[0]):
        raise ValueError(f"DSVConfig.{name}={value!r} is not one of {list(choices)}")
