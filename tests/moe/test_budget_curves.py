"""One measurement of the error curves serves every budget: allocating with ``curves=`` from an
earlier report gives the same experts per layer without a calibration pass."""

from __future__ import annotations

import pytest
import torch

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.moe import MoEfyConfig, moe_layers, moefy_
from moefy.moe import budget as budget_module
from moefy.moe.budget import allocate_experts
from tiny_models import VOCAB, tiny_model


def _blocks() -> TokenBlocks:
    gen = torch.Generator().manual_seed(0)
    return TokenBlocks(torch.randint(3, VOCAB, (16, 24), generator=gen))


def test_given_curves_give_the_same_allocation_without_collecting(monkeypatch) -> None:
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(expert_size=8, method="params"))
    blocks = _blocks()
    first = allocate_experts(model, blocks, 0.6)
    fresh = allocate_experts(model, blocks, 0.4)

    def no_collect(*args, **kwargs):
        raise AssertionError("a calibration pass ran although curves were given")

    monkeypatch.setattr(budget_module, "_collect", no_collect)
    reused = allocate_experts(model, blocks, 0.4, curves=first.errors)
    assert reused.ks == fresh.ks
    assert [m.selector.num_selected() for m in moe_layers(model)] == list(fresh.ks)
    assert reused.flops_share == pytest.approx(fresh.flops_share)


def test_curves_of_another_model_are_refused() -> None:
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(expert_size=8, method="params"))
    with pytest.raises(MoefyError, match="curves= do not fit"):
        allocate_experts(model, _blocks(), 0.5, curves=[[0.0] * 4])
