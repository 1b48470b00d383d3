"""Predictor replicas stay identical across data-parallel ranks (2 gloo processes)."""

import os

import torch

from gloo import spawn

STEPS = 6


def _worker(rank, world, out_dir):
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dsv import DSVConfig
    from megatron_dsv.layers import DSVDotProductAttention

    parallel_state.initialize_model_parallel()
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=2, use_cpu_initialization=True,
                            attention_dropout=0.0, hidden_dropout=0.0)
    dsv = DSVConfig(rank=4, block_q=32, cube=(2, 4, 4), block_kv=32, sample_stride=4, stage1_min_steps=3,
                    stage1_max_steps=4, profile_interval_stage1=1, profile_interval_stage2=2,
                    layer_sparsity_threshold=0.0, predictor_lr=1e-2)
    layer = DSVDotProductAttention(cfg, 1, AttnMaskType.no_mask, "self", dsv_config=dsv)
    gen = torch.Generator().manual_seed(1234 + rank)  # every replica sees different data
    for _ in range(STEPS):
        q, k, v = (torch.randn(128, 1, 2, 32, generator=gen, requires_grad=True) for _ in range(3))
        layer(q, k, v, None).square().mean().backward()
    torch.save(layer.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def test_predictor_and_schedule_identical_across_dp_replicas(tmp_path):
    spawn(_worker, 2, str(tmp_path))
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) or (torch.isnan(a[key]).all() and torch.isnan(b[key]).all()), key
    assert int(a["controller.step"]) == STEPS and int(a["controller.stage"]) == 2
    # Trained at every stage-1 step (0-3) and at stage-2 step 4 (every profile_interval_stage2=2).
    assert float(a["predictor.adam_step"]) == 5
