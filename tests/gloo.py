"""Run a test function in 2 CPU processes joined by a gloo process group (as torchrun would)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, worker: Callable[..., None], port: int, world: int, args: tuple) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(worker: Callable[..., None], *args: Any, world: int = WORLD) -> None:
    """Call ``worker(rank, *args)`` in ``world`` processes; ``worker`` must be module-level."""
    mp.spawn(_entry, args=(worker, free_port(), world, args), nprocs=world, join=True)
