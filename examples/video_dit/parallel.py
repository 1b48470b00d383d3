"""Single-process Megatron setup: torch.distributed (world size 1) + parallel_state."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process(device: torch.device, seed: int = 0) -> None:
    """Initialise a one-rank process group (gloo on CPU, NCCL on GPU) and Megatron's parallel state.

    Megatron's CUDA RNG tracker (model_parallel_cuda_manual_seed) is only seeded on GPU; the
    model is built with use_cpu_initialization=True, so its weights come from torch's CPU RNG
    and are identical on every device.
    """
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    torch.manual_seed(seed)
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
