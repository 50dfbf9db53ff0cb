"""Router training under torch.distributed gives what one process gives.

Each rank collects its shard of the calibration blocks; every layer's samples are gathered on
the rank that trains it (layer i on rank i % world) and the routers are broadcast. With one
block per forward pass the router inputs are bitwise those of one process, so the routers and
the report must be exactly the same.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from moefy.cli.main import main
from moefy.data.blocks import TokenBlocks
from moefy.moe import MoEfyConfig, moe_layers, moefy_
from moefy.routing import RouterConfig, train_routers
from tiny_models import VOCAB, WORDS, save_tiny_hf_folder, tiny_model

WORLD = 2
# forward_batch_size=1: every block runs alone on every rank, as in one process; two rounds,
# so the second collects the routed model's inputs with routers broadcast after the first
CONFIG = RouterConfig(
    router="mlp",
    hidden=8,
    tokens_per_layer=256,
    epochs=2,
    batch_size=32,
    forward_batch_size=1,
    rounds=2,
)


def _blocks() -> TokenBlocks:
    gen = torch.Generator().manual_seed(5)
    return TokenBlocks(torch.randint(3, VOCAB, (7, 16), generator=gen))  # 7 blocks: uneven shards


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train() -> tuple[dict[str, torch.Tensor], dict]:
    torch.set_num_threads(1)
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=4, method="random"))
    report = train_routers(model, _blocks(), CONFIG).to_dict()
    report.pop("seconds")
    state = {
        f"{moe.layer_index}.{name}": tensor.clone()
        for moe in moe_layers(model)
        for name, tensor in moe.selector.state_dict().items()
    }
    return state, report


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        state, report = _train()
        torch.save({"state": state, "report": report}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_train_the_routers_of_one_process(tmp_path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    threads = torch.get_num_threads()
    try:
        single_state, single_report = _train()
    finally:
        torch.set_num_threads(threads)
    assert single_report["n_tokens"] == 7 * 16
    for rank in range(WORLD):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        assert ranked["report"] == single_report
        assert ranked["state"].keys() == single_state.keys()
        for name, tensor in single_state.items():
            torch.testing.assert_close(ranked["state"][name], tensor, rtol=0, atol=0)


def _cli(argv: list[str], launcher: list[str], tmp_path) -> None:
    code = "import sys; from moefy.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*launcher, sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.slow
def test_torchrun_cli_equals_one_process(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    docs = [
        {"text": " ".join(WORDS[i] for i in torch.randint(len(WORDS), (60,), generator=gen))}
        for _ in range(40)
    ]
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps(d) for d in docs))
    model_dir = save_tiny_hf_folder(tmp_path / "tiny")
    moe_dir = tmp_path / "moe"
    assert (
        main(["convert", "--model", str(model_dir), "--experts", "8", "--out", str(moe_dir)]) == 0
    )

    def argv(name: str) -> list[str]:
        return [
            "train-routers", "--model", str(moe_dir), "--data", str(text), "--block-len", "16",
            "--tokens", "208", "--batch-size", "1", "--epochs", "2", "--hidden", "8",
            "--out", str(tmp_path / name), "--eval-tokens", "48", "--fractions", "0.25",
            "--taus", "0.8", "--oracle", "--results", str(tmp_path / f"{name}.json"),
            "--rounds", "2",
        ]  # fmt: skip

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    _cli(argv("dist"), [*torchrun, "--master_port", str(_free_port()), "--no-python"], tmp_path)
    _cli(argv("single"), [], tmp_path)

    runs = ("dist", "single")
    reports = [json.loads((tmp_path / n / "router_report.json").read_text()) for n in runs]
    for report in reports:
        report.pop("seconds")
    assert reports[0] == reports[1] and reports[0]["n_tokens"] == 208
    weights = [load_file(tmp_path / n / "model.safetensors") for n in runs]
    routers = [name for name in weights[1] if ".selector." in name]
    assert routers and weights[0].keys() == weights[1].keys()
    for name in routers:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0)
    rows = [json.loads((tmp_path / f"{n}.json").read_text()) for n in runs]
    assert [r["method"] for r in rows[0]] == [
        "mlp-top25", "mlp-dyn80", "oracle-top25", "oracle-dyn80"
    ]  # fmt: skip
    assert [r["method"] for r in rows[1]] == [r["method"] for r in rows[0]]
    for ours, theirs in zip(*rows, strict=True):
        assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-9)
        assert ours["active_fraction"] == pytest.approx(theirs["active_fraction"], rel=1e-9)
