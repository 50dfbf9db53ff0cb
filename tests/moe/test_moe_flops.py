"""FLOPs accounting: the formula and the measured figures of a moefied model."""

from __future__ import annotations

import pytest
import torch

from moefy.errors import MoefyError
from moefy.moe import (
    MoEfyConfig,
    ffn_flops_per_token,
    flops_report,
    moe_layers,
    moefy_,
    reset_tally,
    set_selection,
)
from tiny_models import D, F, tiny_inputs, tiny_model


def test_dense_formula() -> None:
    # LLaMA-7B FFN: three D x F products, one activation and one gating product per neuron.
    assert ffn_flops_per_token(4096, 11008, gated=True) == 2 * 4096 * 11008 * 3 + 2 * 11008
    # GPT-2 FFN with both biases: two products, up bias and activation per neuron, down bias.
    assert ffn_flops_per_token(768, 3072, gated=False, in_biases=1, out_bias=True) == (
        2 * 768 * 3072 * 2 + 2 * 3072 + 768
    )


def test_formula_is_linear_in_neurons() -> None:
    full = ffn_flops_per_token(64, 256, gated=True, in_biases=2, out_bias=True)
    quarter = ffn_flops_per_token(64, 64, gated=True, in_biases=2, out_bias=True)
    assert quarter - 64 == pytest.approx((full - 64) / 4)


def test_formula_rejects_bad_arguments() -> None:
    with pytest.raises(MoefyError):
        ffn_flops_per_token(64, 10, gated=False, in_biases=2)
    with pytest.raises(MoefyError):
        ffn_flops_per_token(0, 10, gated=True)


def test_measured_flops_follow_selection() -> None:
    model = tiny_model("llama")  # gated, biases on every projection
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    with pytest.raises(MoefyError, match="no tokens"):
        flops_report(model)
    set_selection(model, k=2)
    with torch.no_grad():
        model(**tiny_inputs("llama"))
    report = flops_report(model)
    assert report.active_fraction == pytest.approx(0.25)
    dense_layer = ffn_flops_per_token(D, F, gated=True, in_biases=2, out_bias=True)
    assert report.dense_flops_per_token == pytest.approx(2 * dense_layer)
    spent_layer = ffn_flops_per_token(D, F // 4, gated=True, in_biases=2, out_bias=True)
    assert report.flops_per_token == pytest.approx(2 * spent_layer)
    assert report.flops_ratio < 0.26
    reset_tally(model)
    assert all(int(m.tokens_seen) == 0 for m in moe_layers(model))


def test_tally_counts_every_token() -> None:
    model = tiny_model("gpt2")
    moefy_(model, MoEfyConfig(num_experts=4, method="random"))
    set_selection(model, fraction=0.5)
    inputs = tiny_inputs("gpt2", batch=3, seq=5)
    with torch.no_grad():
        model(**inputs)
    for moe in moe_layers(model):
        assert int(moe.tokens_seen) == 15
        assert int(moe.selection_counts.sum()) == 15 * 2
