r"""Multi-process training with PyTorch's own engine: DistributedDataParallel under ``torchrun``.

``torchrun --nproc_per_node=N -m invertnet.app.cli train ...`` sets ``WORLD_SIZE``/``RANK``; :func:`setup` then joins
the process group (gloo on CPU, nccl on GPU). Each rank computes the loss on its shard of every batch and DDP
averages the gradients, so N ranks with batch B behave like one process with batch B.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["is_main_process", "rank_and_world_size", "resolve_device", "setup", "teardown"]


def setup() -> tuple[int, int]:
    """Join the process group when launched by torchrun with more than one process; returns (rank, world)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return rank_and_world_size()


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (the process that writes checkpoints, metrics and figures)."""
    return rank_and_world_size()[0] == 0


def teardown() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``; under torchrun each rank takes its LOCAL_RANK GPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device; use --device cpu or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
