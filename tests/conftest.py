"""Shared fixtures: a one-process gloo world with Megatron-Core's parallel_state."""

import os

import pytest
import torch

from gloo import free_port


@pytest.fixture(scope="session")
def megatron_parallel():
    """torch.distributed (gloo, world size 1) and parallel_state, initialised once."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    yield parallel_state


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield
