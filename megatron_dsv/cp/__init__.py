"""Hybrid sparsity-aware context parallelism: U x R grid of the CP ranks, uneven head all-to-all,
sparse KV exchange, planner. See DESIGN.md (cp/) and attention.py for the entry points."""

from .all_to_all import gather_segments, head_to_seq, seq_to_head
from .attention import allreduce_head_stats, check_plan_identical, dense_cp_attention, dsv_cp_attention
from .groups import Grid, HybridCPGroup
from .kv_exchange import sparse_kv_attention
from .planner import (CostModel, CPPlan, Replanner, Shape, assign_heads, assign_split, budget_blocks, densities,
                      estimate, fixed_plan, paper_like_densities, plan)

__all__ = [
    "HybridCPGroup", "Grid", "seq_to_head", "head_to_seq", "gather_segments", "sparse_kv_attention",
    "dsv_cp_attention", "dense_cp_attention", "allreduce_head_stats", "check_plan_identical",
    "CostModel", "Shape", "CPPlan", "plan", "fixed_plan", "assign_heads", "assign_split", "budget_blocks",
    "densities", "estimate", "Replanner", "paper_like_densities",
]
