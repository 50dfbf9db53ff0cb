"""Auxiliary-loss-free load balancing evens out a skewed selection, is saved with the model, and
the union of experts a decode batch reads is measured right."""

from __future__ import annotations

import pytest
import torch

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.moe import MoEfyConfig, from_pretrained, moe_layers, moefy_, save
from moefy.moe.budget import collect_layer_inputs
from moefy.routing import set_routing
from moefy.routing.balance import balance_load, expert_union
from tiny_models import VOCAB, tiny_inputs, tiny_model

EXPERTS, K = 8, 2


def _blocks(n_blocks: int = 16, block_len: int = 24, seed: int = 0) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    return TokenBlocks(torch.randint(3, VOCAB, (n_blocks, block_len), generator=gen))


def _skewed_model():
    """Oracle top-2 of 8 experts where experts 0 and 1 have 3x the output: picked far more."""
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(expert_size=8, method="params"))
    for moe in moe_layers(model):
        with torch.no_grad():
            moe.w_out[:2] *= 3.0
    set_routing(model, "topk", k=K)
    return model


def _loads(model, blocks) -> list[torch.Tensor]:
    """Tokens per expert of each layer in a real (routed) forward over ``blocks``."""
    layers = moe_layers(model)
    for moe in layers:
        moe.reset_counters()
    with torch.no_grad():
        model(input_ids=blocks.input_ids)
    return [moe.selection_counts.float() for moe in layers]


def test_bias_balances_a_skewed_router() -> None:
    model = _skewed_model()
    blocks = _blocks()
    before = _loads(model, blocks)
    report = balance_load(model, blocks, steps=150, rate=0.02)
    after = _loads(model, blocks)
    assert len(report.layers) == 2
    for layer, old, new in zip(report.layers, before, after, strict=True):
        assert layer.imbalance_before > 2.0
        assert layer.imbalance_after < 1.5
        assert float(new.max() / new.mean()) < 0.75 * float(old.max() / old.mean())
    for moe in moe_layers(model):
        bias = moe.selector.load_bias
        assert bias is not None and float(bias[:2].mean()) < float(bias[2:].mean())
        assert moe.selector.num_selected() == K  # the budget is unchanged


def test_shared_experts_get_no_bias_and_stay_selected() -> None:
    model = _skewed_model()
    for moe in moe_layers(model):
        moe.num_shared = 1
    balance_load(model, _blocks(), steps=50)
    for moe in moe_layers(model):
        assert float(moe.selector.load_bias[0]) == 0.0
    loads = _loads(model, _blocks())
    tokens = _blocks().input_ids.numel()
    assert all(int(load[0]) == tokens for load in loads)


def test_union_of_experts_read_by_a_batch() -> None:
    model = _skewed_model()
    blocks = _blocks()
    inputs = collect_layer_inputs(model, blocks)
    sizes = (1, 4, 16)
    plain = expert_union(model, inputs=inputs, batch_sizes=sizes)
    balance_load(model, inputs=inputs, steps=150, rate=0.02)
    balanced = expert_union(model, inputs=inputs, batch_sizes=sizes)
    for union in (plain, balanced):
        assert union.batch_sizes == sizes
        assert union.mean[0] == pytest.approx(K / EXPERTS)  # one token reads its k experts
        for layer in union.layers:
            assert list(layer) == sorted(layer)  # more tokens read at least as many experts
            assert all(
                s <= min(1.0, b * K / EXPERTS) + 1e-9 for s, b in zip(layer, sizes, strict=True)
            )
    # evening out the load spreads a batch's tokens over more experts
    assert balanced.mean[1] > plain.mean[1] and balanced.mean[2] >= plain.mean[2]


def test_saved_and_loaded_model_keeps_the_bias(tmp_path) -> None:
    model = _skewed_model()
    balance_load(model, _blocks(), steps=40)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    loaded = from_pretrained(save(model, tmp_path / "balanced"))
    for ours, theirs in zip(moe_layers(model), moe_layers(loaded), strict=True):
        assert bool(ours.selector.load_bias.abs().sum() > 0)
        torch.testing.assert_close(theirs.selector.load_bias, ours.selector.load_bias)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps"),
        ({"rate": 0.0}, "rate"),
        ({"rate": float("nan")}, "rate"),
        ({"batch_tokens": 0}, "batch_tokens"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message) -> None:
    with pytest.raises(MoefyError, match=message) as caught:
        balance_load(_skewed_model(), _blocks(2), **kwargs)
    assert "\n" not in str(caught.value)


def test_tau_rules_and_missing_data_are_errors() -> None:
    model = _skewed_model()
    set_routing(model, "dynamic", tau=0.8)
    with pytest.raises(MoefyError, match="top-k"):
        balance_load(model, _blocks(2))
    with pytest.raises(MoefyError, match="calibration blocks"):
        expert_union(_skewed_model())
    with pytest.raises(MoefyError, match="batch sizes"):
        expert_union(_skewed_model(), _blocks(2), batch_sizes=(0,))
