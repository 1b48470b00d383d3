"""DSVDotProductAttention under context parallelism (2 gloo processes) against one process on the
whole sequence: outputs and gradients in stage 1 (dense) and stage 2 (sparse), and the predictor
it learns; for one sequence and for packed clips (one of them spanning both ranks)."""

import json
import os

import pytest
import torch

from gloo import spawn

S, B, H, D = 256, 1, 2, 16
STEPS = 7


def _layer(cp_size, dsv):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dsv.layers import DSVDotProductAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=H * D, num_attention_heads=H, use_cpu_initialization=True,
                            attention_dropout=0.0, hidden_dropout=0.0, context_parallel_size=cp_size)
    return DSVDotProductAttention(cfg, 1, AttnMaskType.no_mask, "self", dsv_config=dsv)


# Packed clips of 40, 150 and 30 tokens at block-aligned starts 0, 64, 224 (the 150-token clip spans
# both ranks' shares of 128 tokens); sbhd with cu_seqlens, as Megatron passes packed batches.
CLIPS = [40, 150, 30]
STARTS = [0, 64, 224]


def _packed_params():
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0] + [sum(CLIPS[:i + 1]) for i in range(len(CLIPS))], dtype=torch.int32)
    cu_padded = torch.tensor(STARTS + [S], dtype=torch.int32)
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                           cu_seqlens_kv_padded=cu_padded, max_seqlen_q=max(CLIPS), max_seqlen_kv=max(CLIPS))


def _worker(rank, world, out_dir, head_parallel, packed):
    from megatron.core import parallel_state

    from megatron_dsv import DSVConfig
    from megatron_dsv.cp import kv_exchange

    # The packed runs ask for reproducible kernels: every sparse call of the CP path must be told so.
    seen = set()
    real = kv_exchange.block_sparse_attention
    kv_exchange.block_sparse_attention = lambda *a, **kw: seen.add(kw["deterministic"]) or real(*a, **kw)
    parallel_state.initialize_model_parallel(context_parallel_size=world)
    dsv = DSVConfig(rank=4, block_q=32, cube=(2, 4, 4), block_kv=32, sample_stride=4, stage1_min_steps=4,
                    stage1_max_steps=4, profile_interval_stage1=2, profile_interval_stage2=2, predictor_lr=1e-2,
                    layer_sparsity_threshold=0.0, budget_floor=0.0, budget_ceiling=0.5,
                    cp_head_parallel_size=head_parallel, deterministic_backward=packed)
    cp_layer, ref = _layer(world, dsv), _layer(1, dsv)
    shard = slice(rank * S // world, (rank + 1) * S // world)
    gen = torch.Generator().manual_seed(7)  # every rank draws the same full batch
    errors = {"out": 0.0, "grad": 0.0, "sparse_steps": 0}
    params = _packed_params() if packed else None  # padding holds random values, as any tensor may
    for step in range(STEPS):
        q, k, v = (torch.randn(S, B, H, D, dtype=torch.float64, generator=gen) for _ in range(3))
        dy = torch.randn(S, B, H * D, dtype=torch.float64, generator=gen)
        if step == 4:  # stage 2 starts from one state; from here both learn on their own again
            ref.load_state_dict(cp_layer.state_dict())
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        part = [t[shard].clone().requires_grad_() for t in (q, k, v)]
        y_ref = ref(*full, None, packed_seq_params=params)
        y_cp = cp_layer(*part, None, packed_seq_params=params)
        (y_ref * dy).sum().backward()
        (y_cp * dy[shard]).sum().backward()
        assert cp_layer.last_used_sparse == ref.last_used_sparse
        errors["sparse_steps"] += int(cp_layer.last_used_sparse)
        errors["out"] = max(errors["out"], float((y_cp - y_ref[shard]).abs().max()))
        for a, b in zip(part, full):
            errors["grad"] = max(errors["grad"], float((a.grad - b.grad[shard]).abs().max()))
        if step == 3:  # end of stage 1: both learned the same predictor from the same sampled rows
            errors["predictor"] = float((cp_layer.predictor.wq - ref.predictor.wq).abs().max()
                                        / ref.predictor.wq.abs().max())
            errors["profile"] = float((cp_layer.controller.block_sparsity - ref.controller.block_sparsity).abs().max())
    # Stage-2 profiling and fine-tuning (steps 4 and 6) under CP match the single process too.
    errors["predictor_end"] = float((cp_layer.predictor.wq - ref.predictor.wq).abs().max() / ref.predictor.wq.abs().max())
    errors["recall_end"] = float((cp_layer.controller.recall - ref.controller.recall).abs().max())
    errors["stage"] = cp_layer.controller.host()["stage"]
    errors["step"] = cp_layer.controller.host()["step"]
    errors["deterministic_seen"] = sorted(seen)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(errors, f)


@pytest.mark.parametrize("packed", [False, True], ids=["one_sequence", "packed"])
@pytest.mark.parametrize("head_parallel", [2, 1], ids=["U2xR1", "U1xR2"])
def test_cp_layer_matches_single_process(tmp_path, head_parallel, packed):
    spawn(_worker, 2, str(tmp_path), head_parallel, packed)
    for rank in range(2):
        e = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert e["out"] < 1e-10 and e["grad"] < 1e-10, e
        assert e["predictor"] < 1e-4 and e["profile"] < 1e-5, e
        assert e["predictor_end"] < 1e-4 and e["recall_end"] < 1e-5, e
        assert e["stage"] == 2 and e["step"] == STEPS and e["sparse_steps"] == STEPS - 4, e
        assert e["deterministic_seen"] == [packed], e


def _fault_worker(rank, world, out_dir, fault):
    import time

    from megatron.core import parallel_state

    from megatron_dsv import DSVConfig

    # Megatron's CP groups take distributed_timeout_minutes (a timedelta of minutes: half a minute here), and
    # DSV's checks take the CP group's timeout, so a stuck rank fails its peers fast.
    parallel_state.initialize_model_parallel(context_parallel_size=world,
                                             distributed_timeout_minutes=0.2 if fault == "stuck_bwd" else 0.5)
    dsv = DSVConfig(rank=4, block_q=32, cube=(2, 4, 4), block_kv=32)
    if rank == 1 and fault in ("block_kv", "predictor_lr"):   # rank 1 built from another config
        dsv = dsv.replace(**{fault: {"block_kv": 64, "predictor_lr": 1e-2}[fault]})
    layer = _layer(world, dsv)
    if rank == 1 and fault == "step":   # rank 1 resumed from another checkpoint: a step ahead
        layer.controller.end_step()
    s_local = 96 if fault == "lengths" and rank == 1 else 128   # "lengths": rank 1 holds fewer tokens
    dtype = torch.float64 if fault == "dtypes" and rank == 1 else torch.float32   # "dtypes": rank 1 in float64
    q, k, v = (torch.randn(s_local, B, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    t0 = time.time()
    if fault == "stuck" and rank == 1:
        time.sleep(45)  # alive but never reaches the collective (past the half-minute timeout)
        os._exit(0)
    try:
        out = layer(q, k, v, None)
        if fault == "stuck_bwd" and rank == 1:
            time.sleep(16)  # ran the forward, never the backward (past the 12-second timeout)
            os._exit(0)
        if fault == "stuck_bwd":
            t0 = time.time()   # (the timeout counts from the backward's first collective)
            out.sum().backward()
        message = "no error"
    except Exception as e:  # noqa: BLE001 - the test checks what was raised
        message = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"message": message, "seconds": time.time() - t0}, f)
    if fault.startswith("stuck"):
        os._exit(0)  # the stuck peer never joins a teardown


@pytest.mark.parametrize("fault, ranks", [
    ("lengths", "query tokens differ across the context-parallel ranks (rank 0: (128,), rank 1: (96,))"),
    ("dtypes", "dtype (code) differ across the context-parallel ranks (rank 0: (2,), rank 1: (3,))"),
    ("block_kv", "DSVConfig.block_kv differ across the context-parallel ranks (rank 0: (32,), rank 1: (64,))"),
    ("predictor_lr", "DSVConfig.predictor_lr differ across the context-parallel ranks"),
    ("step", "step differ across the context-parallel ranks (rank 0: (0,), rank 1: (1,))"),
])
def test_cp_ranks_with_different_shards_fail_on_every_rank_naming_the_layer(tmp_path, fault, ranks):
    """Different lengths, dtypes, DSVConfig fields or controller states on the CP ranks: a ValueError on
    every rank naming the layer, what differs and each rank's value (not an abort in gloo's C++ code, and
    not silently wrong results, as ranks built from different configs gave)."""
    spawn(_fault_worker, 2, str(tmp_path), fault)
    for rank in range(2):
        message = json.loads((tmp_path / f"rank{rank}.json").read_text())["message"]
        assert message.startswith("ValueError") and "layer 1" in message, message
        assert ranks in message, message


def _rank0_of_stuck_run(tmp_path, fault: str, wait: float) -> dict:
    """What rank 0 recorded in a 2-rank run of _fault_worker whose rank 1 gets stuck (`fault`), in a process of
    its own, killed after `wait` seconds."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=spawn, args=(_fault_worker, 2, str(tmp_path), fault))
    proc.start()
    proc.join(timeout=wait)
    if proc.is_alive():
        proc.kill()
    return json.loads((tmp_path / "rank0.json").read_text())


def test_a_stuck_cp_rank_fails_its_peers_within_a_minute(tmp_path):
    """A CP rank that is alive but never reaches the layer's collectives: its peer raises an error naming the
    layer after the CP group's timeout (half a minute here), well within a minute, before the stuck rank
    wakes up."""
    rec = _rank0_of_stuck_run(tmp_path, "stuck", 80)
    assert rec["message"].startswith("RuntimeError: DSVDotProductAttention (layer 1)") and rec["seconds"] < 45, rec


def test_a_cp_rank_stuck_before_its_backward_fails_its_peer_naming_the_layer(tmp_path):
    """A CP rank that ran the forward but never reaches the backward: its peer's backward collective (the
    predictor's all-reduce or the all-to-all's backward) raises an error naming the layer after the CP
    group's timeout (12 seconds here), not only gloo's own message."""
    rec = _rank0_of_stuck_run(tmp_path, "stuck_bwd", 60)
    assert rec["message"].startswith("RuntimeError: DSVDotProductAttention (layer 1)") and rec["seconds"] < 16, rec
    assert "all-reduce" in rec["message"] or "_bwd failed" in rec["message"], rec   # a backward collective


def _plan_search_worker(rank, world):
    from types import SimpleNamespace

    from megatron_dsv import DSVConfig
    from megatron_dsv.layers import context_parallel as lcp

    cfg = DSVConfig(block_q=16, block_kv=16, cube=(1, 4, 4), rank=4, backend="reference", cp_plan_search="measured",
                    cp_replan_interval=5)
    searches = []
    real = lcp.fastest_plan
    lcp.fastest_plan = lambda plans, step, group: searches.append(len(plans)) or real(plans, step, group)
    gen = torch.Generator().manual_seed(3)
    S, H, d = 128, 4, 8
    q, k, v = (torch.randn(S, 1, H, d, generator=gen) for _ in range(3))
    predictor = SimpleNamespace(wq=torch.randn(H, d, 4, generator=gen), wk=torch.randn(H, d, 4, generator=gen))
    shard = slice(rank * S // world, (rank + 1) * S // world)
    budgets = [1, 2, 3, 5]
    outs = {}
    for mode in ("measured", "model"):
        cp = lcp.LayerContextParallel(cfg.replace(cp_plan_search=mode), heads=H, head_dim=d, process_group=None,
                                      ranks=None)
        outs[mode] = cp.sparse(q[shard], k[shard], v[shard], predictor, budgets, None, step=0)
        if mode == "measured":
            pair = cp._pairs[(S, 1)]
            assert (cp._plans[(S, 1)].U, cp._plans[(S, 1)].schedule) == pair
            cp.sparse(q[shard], k[shard], v[shard], predictor, budgets, None, step=5)   # a re-plan: no new search
            assert (cp._plans[(S, 1)].U, cp._plans[(S, 1)].schedule) == pair
    # U = 1 gather, U = 1 ring, U = 2: timed once, and the measured plan computes the same attention.
    assert searches == [3], searches
    torch.testing.assert_close(outs["measured"], outs["model"], rtol=1e-5, atol=1e-5)


def test_cp_plan_search_times_the_short_list_once_per_shape():
    """cp_plan_search='measured': the first stage-2 call at a shape times the cost model's best plan of each
    (U, schedule) on every rank and keeps the fastest pair; re-plans stay in it; the result is the same
    attention as under the model's plan."""
    spawn(_plan_search_worker, 2)
