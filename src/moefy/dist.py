"""torch.distributed helpers: every verb runs unchanged under ``torchrun``.

Ranks take disjoint shards of the data; statistics are sums that are all-reduced, so the result
equals a single-process run on the same data. Without an initialised process group these helpers
are no-ops.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Initialise the process group when launched by ``torchrun``; return whether distributed.

    Uses gloo on CPU and nccl when CUDA is available. Safe to call twice.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
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
    """Sum ``tensor`` over ranks in place (no-op outside a process group) and return it."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for all ranks (no-op outside a process group)."""
    if rank_and_world()[1] > 1:
        dist.barrier()
