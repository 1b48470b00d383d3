"""Hybrid CP under gloo on CPU: 2, 4, 6 and 8 processes, float64, against single-process references.

Each test starts one process group (tests/cp_workers/worker.py, one subprocess per rank) that runs
several suites in a row, so process start-up is paid once per world size:
  layout    exact head all-to-all / gather values encoding (position, head, channel, batch), their
            autograd, closed-form byte counts, plan digests and per-head stat all-reduce;
  sparse    sparse_kv_attention (gather and ring) forward + dq/dk/dv vs the reference for every
            U x R of the world (U <= 6 heads), random and adversarial selections (every block, one
            dense head with the rest near-empty, query blocks with only remote blocks or nothing,
            a rank needing nothing, all-local -> every exchange skipped); bytes == closed form,
            never above a dense ring;
  entry     dsv_cp_attention (selection after the all-to-all) and dense_cp_attention (stage 1);
  subgroups two CP groups of non-contiguous global ranks inside one world of 8;
  packed    packed clips (mixed lengths, clips spanning ranks, garbage in the padding): both entry
            points against the single-process packed reference ops;
  triton    the Triton backend under TRITON_INTERPRET=1 (set only in the workers' environment, so
            the pytest process itself is unaffected), float32, against a float64 reference.
A hang fails fast: 60 s gloo timeouts in the workers and a wall-clock limit here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_cases.runner import interpreter_problem

WORKER = Path(__file__).parent / "cp_workers" / "worker.py"


def launch(suites: str, world: int, tmp_path, limit_s: float = 150.0, **extra_env):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra_env)
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, str(WORKER), suites, str(world), str(r), str(init)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs, failed = [], []
    try:
        for r, p in enumerate(procs):
            out, _ = p.communicate(timeout=limit_s)
            outputs.append(out)
            if p.returncode != 0:
                failed.append(r)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{suites} on {world} ranks did not finish in {limit_s} s (hang?)")
    if failed:
        pytest.fail(f"{suites} failed on ranks {failed}:\n" + "\n".join(outputs[r][-3000:] for r in failed[:2]))


@pytest.mark.parametrize("world,suites", [
    (2, "layout+sparse+entry+packed"),      # U x R: 1x2, 2x1
    (4, "layout+sparse+entry+packed"),      # 1x4, 2x2, 4x1
    (6, "layout+sparse+entry+packed"),      # 1x6, 2x3, 3x2, 6x1
    (8, "sparse+subgroups"),         # 1x8, 2x4, 4x2; two 2x2 groups on ranks {0,2,4,6}, {1,3,5,7}
])
def test_cp_gloo(world, suites, tmp_path):
    launch(suites, world, tmp_path)


def test_cp_gloo_triton_backend(tmp_path):
    problem = interpreter_problem()   # gloo moves CPU tensors: the workers interpret the kernels, even on a GPU machine
    if problem is not None:
        if torch.cuda.is_available():   # there the other tests check the kernels compiled; CPU CI checks this one
            pytest.skip(problem)
        raise AssertionError(problem)
    launch("triton", 2, tmp_path, TRITON_INTERPRET="1")
