"""Hybrid sparsity-aware context parallelism (CP): the P context-parallel ranks as a U x R grid.

U consecutive ranks (inside a node) split the heads by an uneven all-to-all; the R ranks across
them hold the R sequence segments of the same heads and exchange only the KV blocks their query
blocks selected. Modules: groups.py (grid over Megatron's CP group), all_to_all.py (head
all-to-all, segment gather), kv_exchange.py (sparse KV exchange + block-sparse attention),
planner.py (cost model, head assignment, (U, R) and schedule choice), plan_search.py (the choice
between (U, schedule) pairs by timing), calibration.py (the cost model measured on the machine),
attention.py (entry points).

Wiring into a layer (every CP rank runs the same calls in the same order)::

    from megatron.core import parallel_state as ps
    group = HybridCPGroup(ps.get_context_parallel_group(), ps.get_context_parallel_global_ranks())
    shape = Shape(seq_len=s_local * group.size, heads=H, head_dim=d, batch=b, block_q=..., block_kv=...)
    budgets = allreduce_head_stats(profiled_budgets, group, measured_heads)   # identical on all ranks
    cp_plan = replanner(budgets)            # Replanner(interval, shape=shape, P=group.size, cost=...)
    check_plan_identical(cp_plan, group)    # debug mode only
    # stage 1 (dense; hands back whole-sequence keys of this rank's heads for predictor/profiler):
    out, (heads, q_seg, k_full) = dense_cp_attention(q, k, v, group=group, U=cp_plan.U, return_heads=True)
    # stage 2 (sparse):
    out = dsv_cp_attention(q, k, v, wq_lr, wk_lr, budgets, group=group, plan=cp_plan,
                           block_q=..., block_kv=..., scale=..., backend=...)
"""

from .all_to_all import gather_segments, head_to_seq, seq_to_head
from .attention import allreduce_head_stats, check_plan_identical, dense_cp_attention, dsv_cp_attention
from .groups import Grid, HybridCPGroup
from .kv_exchange import sparse_kv_attention
from .plan_search import fastest_plan, measure_plans
from .planner import (CostModel, CPPlan, Replanner, Shape, assign_heads, assign_split, budget_blocks,
                      candidate_plans, densities, estimate, fixed_plan, paper_like_densities, plan)

__all__ = [
    "HybridCPGroup", "Grid", "seq_to_head", "head_to_seq", "gather_segments", "sparse_kv_attention",
    "dsv_cp_attention", "dense_cp_attention", "allreduce_head_stats", "check_plan_identical",
    "CostModel", "Shape", "CPPlan", "plan", "fixed_plan", "assign_heads", "assign_split", "budget_blocks",
    "densities", "estimate", "Replanner", "paper_like_densities", "candidate_plans", "measure_plans", "fastest_plan",
]
