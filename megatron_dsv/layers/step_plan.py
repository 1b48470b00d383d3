"""The decisions a DSV layer fixes for one training step that a captured step replays (step_graph.py)."""

from __future__ import annotations

from typing import NamedTuple, Optional


class StepPlan(NamedTuple):
    """One layer's part of a step graph's key (DSVDotProductAttention.plan_step): two steps with equal
    plans launch the same kernels on the same shapes, whatever the budgets (read from the device)."""

    shape: tuple                    # q [s, b, heads, d]
    stage: int
    n_kv: int                       # KV blocks of the sequence
    sparse: bool
    rows: Optional[int]             # query rows sampled to train the predictor or profile; None: neither
    k_max: Optional[int]            # width of the block lists, where sparse
    profile: bool                   # the step profiles (true attention rows of the sampled cubes)
    recall_k_max: Optional[int]     # width of the profile's own selection (a dense layer's profile)

    @property
    def learns(self) -> bool:
        """The step trains the predictor or profiles: its backward runs the bookkeeping's own backward,
        which torch.compile does not trace (a CUDA graph captures it)."""
        return self.rows is not None
