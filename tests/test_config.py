import argparse

import pytest

from megatron_dsv import DSVConfig, add_dsv_args


def test_defaults_are_valid_and_cube_matches_block():
    cfg = DSVConfig()
    assert cfg.block_q == 64 and cfg.cube == (4, 4, 4) and cfg.theta == 0.9 and cfg.loss_threshold == 0.01


@pytest.mark.parametrize("field, value, match", [
    ("rank", 0, r"rank=0 is out of range \[1, 256\]"),
    ("rank", 2.0, "rank must be an int"),
    ("block_q", 48, r"block_q=48 is not one of"),
    ("block_kv", 8, r"block_kv=8 is not one of"),
    ("cube", (2, 4, 4), r"cube \(2, 4, 4\) holds 32 tokens but block_q is 64"),
    ("estimator", "oracle", r"estimator='oracle' is not one of \['lowrank', 'pooled'\]"),
    ("theta", 1.0, r"theta=1.0 is out of range \(0.0, 1.0\)"),
    ("ema_alpha", 1.0, r"ema_alpha=1.0 is out of range \[0.0, 1.0\)"),
    ("sample_stride", 0, "sample_stride"),
    ("stage1_max_steps", 10, r"stage1_max_steps=10 is out of range \[stage1_min_steps=50"),
    ("budget_ceiling", 0.01, r"budget_ceiling=0.01 is out of range \[budget_floor=0.05"),
    ("predictor_lr", 0.0, r"predictor_lr=0.0 is out of range \(0.0"),
    ("backend", "cuda", "backend='cuda' is not one of"),
    ("cp_head_parallel_size", 0, "cp_head_parallel_size"),
    ("theta", float("nan"), "theta must be a number"),
])
def test_invalid_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        DSVConfig(**{field: value})


def test_from_args_round_trip():
    parser = add_dsv_args(argparse.ArgumentParser())
    args = parser.parse_args(["--dsv", "--dsv-rank", "8", "--dsv-block-q", "32", "--dsv-cube", "2", "4", "4",
                              "--dsv-estimator", "pooled", "--dsv-theta", "0.95", "--dsv-cp-head-parallel-size", "2"])
    cfg = DSVConfig.from_args(args)
    assert args.dsv
    assert (cfg.rank, cfg.block_q, cfg.cube, cfg.estimator, cfg.theta, cfg.cp_head_parallel_size) == (
        8, 32, (2, 4, 4), "pooled", 0.95, 2)
    assert DSVConfig.from_args(parser.parse_args([])) == DSVConfig()
    with pytest.raises(ValueError, match="block_q"):
        DSVConfig.from_args(parser.parse_args(["--dsv-block-q", "32"]))  # cube still 4x4x4


@pytest.mark.parametrize("changes, match", [
    (dict(block_q=64.0), r"block_q=64.0 is not one of"),
    (dict(cube=(4.5, 4, 4)), "cube must be three positive ints"),
    (dict(cube="444"), "cube must be three positive ints"),
    (dict(cube=(True, 8, 8)), "cube must be three positive ints"),
    (dict(cube=64), "cube must be three positive ints"),
    (dict(cube=None), "cube must be three positive ints"),
    (dict(cuda_graphs=1), "cuda_graphs must be a bool"),
    (dict(dispatch="measured", backend="reference"), "dispatch='measured' times the GPU kernels"),
])
def test_values_of_the_wrong_type_are_not_coerced(changes, match):
    with pytest.raises(ValueError, match=match):
        DSVConfig(**changes)


def test_fields_set_after_construction_are_validated():
    cfg = DSVConfig()
    with pytest.raises(ValueError, match="block_q=48"):
        cfg.block_q = 48
    with pytest.raises(ValueError, match="cube"):
        cfg.cube = (2, 4, 4)  # 32 tokens, block_q 64
    assert (cfg.block_q, cfg.cube) == (64, (4, 4, 4))  # a rejected value leaves the field as it was
    cfg.theta = 0.8
    cfg.cube = [4, 4, 4]
    assert cfg.theta == 0.8 and cfg.cube == (4, 4, 4) and cfg == DSVConfig(theta=0.8)
