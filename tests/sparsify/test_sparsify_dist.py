"""Two gloo processes, each calibrating on its shard, give the single-process thresholds."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moefy.data.blocks import TokenBlocks
from moefy.sparsify import CHESSConfig, TEALConfig, measure, sparsify_, unsparsify
from moefy.sparsify.wrappers import sparse_modules
from tiny_models import VOCAB, tiny_model

WORLD = 2
# batch_size=1: every block runs alone in both set-ups, so activations are bitwise the same and
# only the order of the all-reduced sums differs.
CONFIGS = (
    TEALConfig(sparsity=0.5, batch_size=1, greedy_tokens=48, min_calibration_tokens=1),
    CHESSConfig(sparsity=0.4, batch_size=1, min_calibration_tokens=1),
)


def _blocks() -> TokenBlocks:
    gen = torch.Generator().manual_seed(5)
    return TokenBlocks(torch.randint(3, VOCAB, (7, 16), generator=gen))  # 7 blocks: uneven shards


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _calibrate(model) -> list[dict[str, object]]:
    results = []
    for config in CONFIGS:
        sparsify_(model, config, _blocks())
        thresholds = {path: w.threshold.clone() for path, w in sparse_modules(model)}
        results.append({"thresholds": thresholds, "total": measure(model, _blocks()).total})
        unsparsify(model)
    return results


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = _calibrate(tiny_model("llama"))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = _calibrate(tiny_model("llama"))
    for rank in range(WORLD):
        distributed = torch.load(tmp_path / f"rank{rank}.pt")
        for ours, theirs, config in zip(distributed, single, CONFIGS, strict=True):
            assert list(ours["thresholds"]) == list(theirs["thresholds"])
            for path, threshold in theirs["thresholds"].items():
                torch.testing.assert_close(
                    ours["thresholds"][path],
                    threshold,
                    rtol=1e-6,
                    atol=0,
                    msg=f"{config.method} {path}",
                )
            assert ours["total"] == pytest.approx(theirs["total"], abs=1e-12)
