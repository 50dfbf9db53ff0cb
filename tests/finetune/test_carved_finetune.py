"""MoE-aware fine-tuning takes a carved model (shared experts, a closed-form router): training
runs the routed experts it selects plus the shared ones, and lowers the loss."""

from __future__ import annotations

import pytest
import torch

from moefy.carve import CarveConfig, carve_
from moefy.data.blocks import TokenBlocks
from moefy.finetune import FinetuneConfig, finetune
from moefy.moe import moe_layers
from moefy.routing import set_routing
from tiny_models import VOCAB, tiny_model


def _blocks(n_blocks: int = 32, block_len: int = 16) -> TokenBlocks:
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(3, VOCAB, (n_blocks, 1), generator=gen)
    ids = (starts + torch.arange(block_len)) % (VOCAB - 3) + 3
    return TokenBlocks(ids, "counting", "calibration")


def _loss(model, data: TokenBlocks) -> float:
    with torch.no_grad():
        return float(model(input_ids=data.input_ids, labels=data.input_ids).loss)


@pytest.mark.parametrize("router", ["lstsq", "analytic"])
def test_finetuning_a_carved_model_lowers_its_routed_loss(router: str) -> None:
    torch.manual_seed(0)
    data = _blocks()
    model = tiny_model("llama")
    carve_(model, data, CarveConfig(expert_size=8, shared=0.25, router=router, pattern_tokens=64))
    set_routing(model, "topk", keep=0.5)
    layers = moe_layers(model)
    assert all(moe.num_shared == 2 for moe in layers)
    before = _loss(model, data)
    config = FinetuneConfig(
        max_steps=30, lr=3e-3, warmup_steps=0, batch_size=4, reg="none", log_every=1
    )
    report = finetune(model, data, config)
    assert report.history[-1]["active_experts"] == pytest.approx(0.5)
    assert _loss(model, data) < before - 0.05
    assert all(moe.num_shared == 2 and moe.selector.num_shared == 2 for moe in layers)
