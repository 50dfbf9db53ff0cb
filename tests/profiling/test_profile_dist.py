"""Two gloo processes, each profiling its shard, give the single-process result."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moefy.data.blocks import TokenBlocks
from moefy.profiling import ProfileConfig, SparsityProfile, profile
from tiny_models import VOCAB, tiny_model

WORLD = 2
# batch_size=1: every block runs alone in both set-ups, so h is bitwise the same and only the
# order of the float64 sums differs
CONFIG = ProfileConfig(batch_size=1, coactivation=True, chunk_sizes=(1, 2, 4))


def _blocks() -> TokenBlocks:
    gen = torch.Generator().manual_seed(5)
    return TokenBlocks(torch.randint(3, VOCAB, (5, 8), generator=gen))  # 5 blocks: uneven shards


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = profile(tiny_model("llama"), _blocks(), CONFIG)
        result.save(os.path.join(out_dir, f"rank{rank}"))  # only rank 0 writes
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert [p.name for p in tmp_path.iterdir()] == ["rank0"]
    distributed = SparsityProfile.load(tmp_path / "rank0")
    single = profile(tiny_model("llama"), _blocks(), CONFIG)
    assert distributed.n_tokens == single.n_tokens == 40
    for i in range(single.num_layers):
        for name, tensor in single.sums(i).items():
            torch.testing.assert_close(distributed.sums(i)[name], tensor, rtol=1e-12, atol=0)
        torch.testing.assert_close(
            distributed.coactivation(i), single.coactivation(i), rtol=0, atol=0
        )
    for ours, theirs in zip(distributed.layers, single.layers, strict=True):
        assert ours.hot_neurons == theirs.hot_neurons
        assert ours.active_fraction == theirs.active_fraction
        assert ours.rms == pytest.approx(theirs.rms, rel=1e-12)
