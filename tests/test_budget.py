"""Budget policies (theta, compute target spread by mass curves, uniform), annealing and dispatch by cost."""

import itertools
import math

import pytest
import torch

from megatron_dsv import DSVConfig
from megatron_dsv.layers.budget import (CURVE_POINTS, annealed_density, block_range, curve_at_blocks, curve_on_grid,
                                        held_on_curve, mass_optimal_blocks, total_blocks, uniform_blocks)
from megatron_dsv.layers.controller import PER_HEAD_BUFFERS, StageController
from megatron_dsv.layers.device_budgets import DeviceBudgets
from megatron_dsv.layers.dispatch import CostDispatch, Costs
from megatron_dsv.layers.profiler import held_curve, profile_logits


def held_mass(curve, blocks, n_kv):
    """The mass each head's curve [heads, CURVE_POINTS + 1] says its `blocks` hold."""
    at_blocks = curve_at_blocks(curve.double(), n_kv)
    return at_blocks[torch.arange(len(blocks)), torch.tensor(blocks)].tolist()


def test_held_on_curve_reads_curve_at_blocks_at_the_budgets():
    """The metrics' held mass (Python, on the mirror's lists) is curve_at_blocks' value, bit for bit, at
    block counts on and between the grid's points, at 0 and n_kv, and NaN for an unprofiled head."""
    gen = torch.Generator().manual_seed(11)
    for n_kv in (1, 7, 128, 300, 1024):
        curve = torch.rand(5, CURVE_POINTS + 1, generator=gen).sort(dim=-1).values   # float32, as profiled
        curve[4] = float("nan")
        blocks = torch.randint(0, n_kv + 1, (5,), generator=gen).tolist()
        blocks[:2] = [0, n_kv]
        got, want = held_on_curve(curve.tolist(), blocks, n_kv), held_mass(curve, blocks, n_kv)
        assert got[:4] == want[:4] and math.isnan(got[4]) and math.isnan(want[4])


def concave_curves(gen, heads, n_kv):
    """Mass curves by block count [heads, n_kv] of random rows whose blocks are ranked by mass (concave)."""
    mass = torch.rand(heads, 5, n_kv, generator=gen) ** (1 + 6 * torch.rand(heads, 1, 1, generator=gen))
    return held_curve(mass / mass.sum(-1, keepdim=True))


def test_curve_grid_round_trip():
    gen = torch.Generator().manual_seed(0)
    for n_kv in (8, 32, 128, 256):
        held = concave_curves(gen, 3, n_kv)
        back = curve_at_blocks(curve_on_grid(held), n_kv)
        assert back[:, 0].abs().max() < 1e-7
        step = max(1, n_kv // CURVE_POINTS)  # block counts that fall on the grid come back exactly
        assert torch.allclose(back[:, step::step], held[:, step - 1::step], atol=1e-6), n_kv
        assert torch.all(back[:, 1:] <= held + 1e-6)  # in between: the chord of a concave curve, below it


def test_mass_optimal_is_the_best_split_of_concave_curves():
    gen = torch.Generator().manual_seed(1)
    heads, n_kv = 3, 8
    for trial in range(20):
        by_blocks = concave_curves(gen, heads, n_kv).double()
        full = torch.cat([torch.zeros(heads, 1, dtype=torch.float64), by_blocks], dim=1)
        curve = curve_on_grid(by_blocks)
        lo, hi = (1, n_kv) if trial % 2 else (2, 6)
        total = int(torch.randint(heads * lo, heads * hi + 1, (1,), generator=gen))
        got = mass_optimal_blocks(curve, total, n_kv, lo, hi)
        assert sum(got) == total and all(lo <= k <= hi for k in got)
        best = max(sum(float(full[h, k]) for h, k in enumerate(ks))
                   for ks in itertools.product(range(lo, hi + 1), repeat=heads) if sum(ks) == total)
        assert sum(held_mass(curve, got, n_kv)) == pytest.approx(best, abs=1e-6)


def test_mass_optimal_holds_at_least_the_uniform_split_and_handles_non_concave_curves():
    gen = torch.Generator().manual_seed(2)
    heads, n_kv = 8, 256
    curve = curve_on_grid(concave_curves(gen, heads, n_kv))
    lo, hi = block_range(n_kv, 0.05, 1.0)
    total = total_blocks(0.1, heads, n_kv, lo, hi)
    spread, even = mass_optimal_blocks(curve, total, n_kv, lo, hi), uniform_blocks(total, heads, lo, hi)
    assert sum(spread) == sum(even) == total
    assert sum(held_mass(curve, spread, n_kv)) > sum(held_mass(curve, even, n_kv))
    # A curve with flat stretches and jumps (an imprecise ranking): still a valid split.
    bumpy = torch.cumsum(torch.rand(heads, n_kv, generator=gen) * (torch.rand(heads, n_kv, generator=gen) > 0.7), -1)
    got = mass_optimal_blocks(curve_on_grid(bumpy / bumpy[:, -1:]), total, n_kv, lo, hi)
    assert sum(got) == total and all(lo <= k <= hi for k in got)


def test_annealed_density_and_totals():
    assert annealed_density(0.6, 0.1, 0, 100) == 0.6
    assert annealed_density(0.6, 0.1, 50, 100) == pytest.approx(0.35)
    assert annealed_density(0.6, 0.1, 100, 100) == 0.1 == annealed_density(0.6, 0.1, 5, 0)
    assert annealed_density(math.nan, 0.1, 5, 100) == 0.1
    levels = [annealed_density(0.6, 0.1, step, 200) for step in range(200)]
    assert len(set(levels)) == 200 and levels == sorted(levels, reverse=True) and levels[0] == 0.6
    assert block_range(100, 0.05, 0.5) == (5, 50) and block_range(3, 0.0, 0.1) == (1, 1)
    assert total_blocks(0.1, 4, 100, 5, 50) == 40 and total_blocks(0.01, 4, 100, 5, 50) == 20
    assert uniform_blocks(10, 4, 1, 10) == [3, 3, 2, 2]


def _profile(ctl, block_sparsity, curve):
    ones = torch.ones(ctl.heads)
    ctl.record_profile({"token_sparsity": ones, "oracle_block_sparsity": ones, "recall": ones,
                        "block_sparsity": torch.tensor(block_sparsity), "mass_curve": curve})


def _run_steps(ctl, n):
    for _ in range(n):
        ctl.end_step()


@pytest.mark.parametrize("policy", ["target", "uniform"])
def test_controller_anneals_from_the_theta_density_to_the_target(policy):
    heads, n_kv = 4, 100
    cfg = DSVConfig(budget_policy=policy, target_density=0.1, anneal_steps=10, budget_floor=0.02,
                    stage1_min_steps=2, stage1_max_steps=2)
    ctl = StageController(cfg, heads)
    curve = curve_on_grid(concave_curves(torch.Generator().manual_seed(3), heads, n_kv))
    _profile(ctl, [0.5, 0.625, 0.75, 0.875], curve)
    assert not ctl.may_run_sparse() and ctl.budgets(n_kv) == [50, 38, 25, 13]  # stage 1: where stage 2 begins
    assert not ctl.annealing()
    _run_steps(ctl, 2)
    assert ctl.in_stage2 and ctl.may_run_sparse() and ctl.annealing()
    assert ctl.host()["anneal_from"] == pytest.approx(0.3125, abs=1e-4)  # the theta rule's mean share
    assert sum(ctl.budgets(n_kv)) == 125
    _run_steps(ctl, 5)
    total = round((0.3125 + (0.1 - 0.3125) * 0.5) * heads * n_kv)
    assert sum(ctl.budgets(n_kv)) == total
    if policy == "target":   # every annealing step's spread, from one ranking of the gains
        assert ctl.budgets(n_kv) == mass_optimal_blocks(curve, total, n_kv, 2, 100)
    _run_steps(ctl, 4)
    assert ctl.annealing()   # its last step
    _run_steps(ctl, 1)
    assert not ctl.annealing()
    budgets = ctl.budgets(n_kv)
    assert sum(budgets) == 40 and min(budgets) >= 2
    if policy == "uniform":
        assert budgets == [10, 10, 10, 10]
    else:
        assert budgets == mass_optimal_blocks(curve, 40, n_kv, 2, 100)
        assert budgets != [10, 10, 10, 10]
        # Profiles of other curves (the heads' reversed) replace the cached ranking of marginal gains: the
        # budgets follow the curve the controller holds now.
        saved = {key: t.clone() for key, t in ctl.state_dict().items()}
        for _ in range(30):
            _profile(ctl, [0.5] * heads, curve.flip(0))
        now = torch.tensor(ctl.host()["mass_curve"], dtype=torch.float64)
        assert ctl.budgets(n_kv) == mass_optimal_blocks(now, 40, n_kv, 2, 100) != budgets
        ctl.load_state_dict(saved)   # (the state the rest of this test resumes from)
        assert ctl.budgets(n_kv) == budgets
    # A checkpoint of the theta rule (no curve, no anneal state) continues in stage 2 under the policy.
    theta_state = {key: t for key, t in ctl.state_dict().items()
                   if key not in ("mass_curve", "stage2_start", "anneal_from")}
    resumed = StageController(cfg, heads)
    resumed.load_state_dict(theta_state)
    assert resumed.in_stage2 and resumed.host()["stage2_start"] == 12
    assert sum(resumed.budgets(n_kv)) == 125   # anneals again from the theta density
    _run_steps(resumed, 10)
    assert resumed.budgets(n_kv) == uniform_blocks(40, heads, 2, 100)  # no curve profiled yet: even split
    # A resumed controller of this code gives the same budgets as the original.
    again = StageController(cfg, heads)
    again.load_state_dict(ctl.state_dict())
    assert again.budgets(n_kv) == budgets
    assert {k: v for k, v in again.host().items() if k != "loss_ema"} == {k: v for k, v in ctl.host().items()
                                                                        if k != "loss_ema"}


@pytest.mark.parametrize("sparsity, sparse", [([0.3, 0.4], False), ([0.9, 0.9], True)])
def test_theta_policy_keeps_the_layer_threshold(sparsity, sparse):
    ctl = StageController(DSVConfig(budget_policy="theta", stage1_min_steps=1, stage1_max_steps=1,
                                    layer_sparsity_threshold=0.5), 2)
    _profile(ctl, sparsity, torch.full((2, CURVE_POINTS + 1), 0.5))
    _run_steps(ctl, 1)
    assert ctl.in_stage2 and ctl.may_run_sparse() == sparse
    assert ctl.budgets(10) == [math.ceil((1 - s) * 10 - 1e-9) for s in torch.tensor(sparsity).tolist()]


def test_profile_mass_curve_is_the_held_mass_in_the_estimators_ranking():
    gen = torch.Generator().manual_seed(4)
    b, h, rows, s, block_q, block_kv = 1, 2, 64, 256, 32, 32
    logits = torch.randn(b, h, rows, s, generator=gen) * 3
    oracle = profile_logits(logits, block_q=block_q, theta=0.9, block_kv=block_kv)
    scores = torch.randn(b, h, 2, s // block_kv, generator=gen)
    est = profile_logits(logits, block_q=block_q, theta=0.9, block_kv=block_kv, cube_scores=scores)
    for prof in (oracle, est):
        curve = prof.mass_curve
        assert curve.shape == (h, CURVE_POINTS + 1)
        assert torch.all(curve.diff(dim=-1) >= -1e-6) and torch.allclose(curve[:, -1], torch.ones(h))
        k = (1 - prof.block_sparsity) * (s // block_kv)
        at = curve_at_blocks(curve, s // block_kv)
        held = at.gather(1, k.long().view(-1, 1)).squeeze(1)
        assert torch.all(held >= 0.9 - 1e-5)   # the theta budget holds theta by the curve too
    assert torch.all(oracle.mass_curve >= est.mass_curve - 1e-6)  # no ranking beats the true mass


def test_cost_dispatch_measures_once_per_shape_and_falls_back_to_density():
    calls = []

    def measure():
        calls.append(1)
        return Costs(dense_ms=10.0, fixed_ms=2.0, per_density_ms=16.0)  # crossover at density 0.5

    dispatch = CostDispatch(DSVConfig(dense_fallback_density=0.65))
    key = (1024, 1, 2, 32, torch.bfloat16, 64, 64, 32, "lowrank")
    assert dispatch.sparse_pays(0.1, key, measure) and dispatch.sparse_pays(0.45, key, measure)
    assert not dispatch.sparse_pays(0.55, key, measure)
    assert len(calls) == 1 and Costs(10.0, 2.0, 16.0).crossover == pytest.approx(0.5)
    assert dispatch.sparse_pays(0.6) and not dispatch.sparse_pays(0.7)  # no measurement: density rule
    assert not CostDispatch(DSVConfig()).measured(torch.device("cpu"), False)
    with pytest.raises(ValueError, match="dispatch='measured'"):
        CostDispatch(DSVConfig(dispatch="measured")).measured(torch.device("cpu"), False)
    del CostDispatch._MEASURED[key]


@pytest.mark.parametrize("bad, fields", [
    (dict(target_density=0.0), "target_density"),
    (dict(target_density=1.5), "target_density"),
    (dict(anneal_steps=-1), "anneal_steps"),
    (dict(budget_policy="target", budget_floor=0.2, target_density=0.1), "budget_floor"),
    (dict(budget_policy="uniform", budget_ceiling=0.05, budget_floor=0.0, target_density=0.1), "budget_ceiling"),
    (dict(budget_policy="oracle"), "budget_policy"),
    (dict(dispatch="fast"), "dispatch"),
])
def test_bad_policy_knobs_raise_naming_the_fields(bad, fields):
    with pytest.raises(ValueError, match=fields):
        DSVConfig(**bad)


def test_profiled_names_cover_the_metrics():
    assert set(PER_HEAD_BUFFERS) < set(StageController(DSVConfig(), 1).state_dict())


def test_model_scope_moves_blocks_from_concentrated_to_spread_layers():
    """Two layers built from one config: the one whose mass sits in few blocks gives blocks to the one
    whose mass is spread; the total stays the target, and more mass is held than per layer."""
    heads, n_kv = 4, 128
    cfg = DSVConfig(budget_policy="target", budget_scope="model", target_density=0.1, anneal_steps=0,
                    budget_floor=0.01, stage1_min_steps=1, stage1_max_steps=1)
    gen = torch.Generator().manual_seed(5)
    peaked = torch.rand(heads, 5, n_kv, generator=gen) * 0.01     # two blocks of each cube hold most of the mass
    peaked[..., :2] += 1.0
    flat = torch.rand(heads, 5, n_kv, generator=gen) + 0.5        # mass spread over all blocks
    curves = [curve_on_grid(held_curve(m / m.sum(-1, keepdim=True))) for m in (peaked, flat)]
    layers = [StageController(cfg, heads) for _ in range(2)]
    for ctl, curve in zip(layers, curves):
        _profile(ctl, [0.5] * heads, curve)
        _run_steps(ctl, 1)
    concentrated, spread = (ctl.budgets(n_kv) for ctl in layers)
    assert abs(sum(concentrated) + sum(spread) - round(0.1 * 2 * heads * n_kv)) <= 2 * heads
    assert sum(concentrated) < round(0.1 * heads * n_kv) < sum(spread)
    per_layer = [mass_optimal_blocks(c, round(0.1 * heads * n_kv), n_kv, 2, n_kv) for c in curves]
    held = lambda budgets: sum(sum(held_mass(c, b, n_kv)) for c, b in zip(curves, budgets))  # noqa: E731
    assert held([concentrated, spread]) > held(per_layer)
    # A layer still in stage 1 keeps its own (theta) budgets; the others pool without it.
    late = StageController(cfg, heads)
    _profile(late, [0.5] * heads, curves[0])
    assert late.budgets(n_kv) == [64] * heads


def test_model_scope_needs_the_target_policy():
    with pytest.raises(ValueError, match="budget_scope='model'"):
        DSVConfig(budget_scope="model", budget_policy="theta")


def test_partial_load_keeps_the_live_loss_ema_and_pending_loss():
    """The loss EMA and the pending loss live on the host between checkpoints: a state dict without them
    (strict=False) leaves them as they are, and the next record folds the pending loss as before."""
    cfg = DSVConfig(ema_alpha=0.5)
    ctl = StageController(cfg, heads=2)
    for loss in (0.8, 0.4):
        ctl.record_loss(torch.tensor(loss))
    ctl.load_state_dict({"step": torch.tensor(5)}, strict=False)
    assert ctl.host()["step"] == 5 and ctl.host()["loss_ema"] == pytest.approx(0.8)
    ctl.record_loss(torch.tensor(0.2))
    assert ctl.host()["loss_ema"] == pytest.approx(0.6)


def test_loss_ema_folds_each_loss_once_a_step_behind_and_resumes_exactly():
    """record_loss reads no device value at once: the EMA takes in the previous step's loss. Every loss
    is folded exactly once, in order, and a controller loaded from a checkpoint taken between two
    records folds the pending loss as the uninterrupted one does."""
    cfg = DSVConfig(ema_alpha=0.5)
    losses = [0.8, 0.4, 0.2, 0.1]
    ctl = StageController(cfg, heads=2)
    emas = []
    for i, loss in enumerate(losses):
        ctl.record_loss(torch.tensor(loss))
        emas.append(ctl.host()["loss_ema"])
        if i == 1:
            resumed = StageController(cfg, heads=2)
            resumed.load_state_dict(ctl.state_dict())
    assert math.isnan(emas[0])
    assert emas[1:] == pytest.approx([0.8, 0.5 * 0.8 + 0.5 * 0.4, 0.5 * (0.5 * 0.8 + 0.5 * 0.4) + 0.5 * 0.2])
    for loss in losses[2:]:
        resumed.record_loss(torch.tensor(loss))
    assert resumed.host()["loss_ema"] == ctl.host()["loss_ema"]
    saved, resumed_saved = ctl.state_dict(), resumed.state_dict()
    for name in ("loss_pending", "loss_ema"):
        assert torch.equal(resumed_saved[name], saved[name]), name
    assert float(saved["loss_pending"]) == pytest.approx(0.1) and float(saved["loss_ema"]) == ctl.host()["loss_ema"]


def test_rounded_list_width_grows_while_annealing_and_settles_with_a_margin():
    """k_max (the block-list width a captured graph is keyed by) is a power of two that only grows while
    the budgets anneal, settles once at the anneal's end, and afterwards shrinks only when the largest
    budget is at most 3/4 of the narrower width (a budget moving by a block across a power of two keeps it)."""
    held = DeviceBudgets(rounded=True)
    cpu = torch.device("cpu")
    widths = []
    for largest in (200, 120, 60, 30):   # the anneal: budgets fall
        held.hold([largest, 1], 256, cpu, annealing=True)
        widths.append(held.k_max)
    assert widths == [256] * 4 and held.tensor.tolist() == [30, 1]
    held.hold([30, 1], 256, cpu)   # the anneal's end: settles at 32 (the width it ends at, margin or not)
    assert held.k_max == 32
    held.hold([33, 1], 256, cpu)   # a profile adds a block: grows at once
    assert held.k_max == 64
    held.hold([31, 1], 256, cpu)   # and back: 31 > 3/4 x 32, the width stays
    assert held.k_max == 64
    held.hold([24, 1], 256, cpu)   # clearly narrower: shrinks
    assert held.k_max == 32
    held.hold([250, 1], 256, cpu)   # never wider than the KV blocks
    assert held.k_max == 256
    held.hold([200, 1], 256, cpu, annealing=True)   # a wide width while annealing ...
    held.hold([3, 1], 4, cpu, annealing=True)   # ... and then a shorter sequence: the width starts afresh
    assert held.k_max == 4
    held.hold([3, 1], 4, cpu)
    held.hold([3, 1], 256, cpu)   # the same budgets at another length
    assert held.k_max == 4 and held.n_kv == 256
    exact = DeviceBudgets(rounded=False)   # off the GPU: the largest budget, anneal or not
    for largest in (200, 30):
        exact.hold([largest, 1], 256, cpu, annealing=True)
        assert exact.k_max == largest
