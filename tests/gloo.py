"""Run a test body in several gloo processes on this machine (torch.multiprocessing spawn)."""

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=60)  # a hung collective fails fast


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, worker, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # The worker passed. Leave without running C++ static destructors: under load a library thread
    # still joinable at interpreter teardown aborts the process ("terminate called without an active
    # exception") after the work is done, as tests/cp_workers/worker.py also avoids.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker, world: int, *args) -> None:
    """worker(rank, world, *args) in `world` processes joined in one gloo group; raises if any fails.
    `worker` must be a module-level function (it is pickled by name)."""
    mp.spawn(_entry, args=(worker, world, free_port(), args), nprocs=world, join=True)
