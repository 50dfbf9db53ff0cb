"""torch.distributed helpers: every verb runs unchanged under ``torchrun``.

Ranks take disjoint shards of the data; statistics are sums that are all-reduced, so the result
equals a single-process run on the same data. Without an initialised process group these helpers
are no-ops.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device | None = None) -> bool:
    """Initialise the process group when launched by ``torchrun``; return whether distributed.

    Args:
        device: where this process runs its model: nccl (with this GPU as the current one) for
            a CUDA device, gloo otherwise. None keeps the old choice: nccl whenever CUDA is
            available.

    Safe to call twice.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_gpu and device is not None:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    return True


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and outside a process group): only it writes files and prints."""
    return rank_and_world()[0] == 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op outside a process group) and return it.

    Under nccl a CPU tensor (a small count or a figure kept on the host) travels through the
    current GPU and back, so callers need not know the backend.
    """
    if rank_and_world()[1] > 1:
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            tensor.copy_(on_gpu)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Copy rank ``src``'s ``tensor`` to every rank in place (no-op outside a process group).

    Like :func:`all_reduce_sum_`, a CPU tensor travels through the current GPU under nccl.
    """
    if rank_and_world()[1] > 1:
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(on_gpu, src=src)
            tensor.copy_(on_gpu)
        else:
            dist.broadcast(tensor, src=src)
    return tensor


def barrier() -> None:
    """Wait for all ranks (no-op outside a process group)."""
    if rank_and_world()[1] > 1:
        dist.barrier()
