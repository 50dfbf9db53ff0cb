"""Two gloo processes train the same routers: gradients are averaged across ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moefy.data.blocks import TokenBlocks
from moefy.moe import MoEfyConfig, moe_layers, moefy_
from moefy.routing import RouterConfig, train_routers
from tiny_models import VOCAB, tiny_model

WORLD = 2
CONFIG = RouterConfig(router="mlp", hidden=8, tokens_per_layer=256, epochs=2, batch_size=32)


def _blocks() -> TokenBlocks:
    gen = torch.Generator().manual_seed(5)
    return TokenBlocks(torch.randint(3, VOCAB, (7, 16), generator=gen))  # 7 blocks: uneven shards


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = tiny_model("llama")
        moefy_(model, MoEfyConfig(num_experts=4, method="random"))
        report = train_routers(model, _blocks(), CONFIG)
        state = {
            f"{moe.layer_index}.{name}": tensor
            for moe in moe_layers(model)
            for name, tensor in moe.selector.state_dict().items()
        }
        torch.save({"state": state, "n_tokens": report.n_tokens, "recall": report.mean_recall},
                   os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_end_with_the_same_routers(tmp_path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert zero["n_tokens"] == one["n_tokens"] == 7 * 16
    assert zero["recall"] == one["recall"]  # held-out metrics are summed over ranks
    for name, tensor in zero["state"].items():
        torch.testing.assert_close(one["state"][name], tensor, rtol=0, atol=0)
