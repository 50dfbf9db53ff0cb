"""Per-layer expert budgets: the greedy allocation reaches the FLOPs budget, follows the error
curves, keeps shared experts, and its dynamic-k variant matches the allocated means."""

from __future__ import annotations

import pytest
import torch

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.moe import MoEfyConfig, moe_layers, moefy_
from moefy.moe.budget import (
    _collect,
    allocate_experts,
    collect_layer_inputs,
    error_curve,
    layer_scores,
)
from moefy.moe.selectors import DYNAMIC
from tiny_models import VOCAB, tiny_inputs, tiny_model

EXPERTS = 8  # d_ff 64 in experts of 8


def _blocks(n_blocks: int = 16, block_len: int = 24, seed: int = 0) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    return TokenBlocks(torch.randint(3, VOCAB, (n_blocks, block_len), generator=gen))


def _moefied(name: str = "llama"):
    model = tiny_model(name)
    moefy_(model, MoEfyConfig(expert_size=8, method="params"))
    return model


def _flops_share(model, ks) -> float:
    layers = moe_layers(model)
    spent = sum(m.flops_per_token(experts_per_token=k) for m, k in zip(layers, ks, strict=True))
    return spent / sum(m.dense_flops_per_token() for m in layers)


@pytest.mark.parametrize("keep", [0.75, 0.3])
def test_greedy_reaches_the_budget_within_one_expert_step(keep: float) -> None:
    model = _moefied()
    report = allocate_experts(model, _blocks(), keep)
    layers = moe_layers(model)
    one_step = max(m.flops_per_token(experts_per_token=1.0) for m in layers) / sum(
        m.dense_flops_per_token() for m in layers
    )
    assert report.flops_share <= keep + 1e-12
    assert report.flops_share > keep - one_step
    assert report.flops_share == pytest.approx(_flops_share(model, report.ks))
    assert [m.selector.num_selected() for m in layers] == list(report.ks)
    assert len(report.errors) == len(layers) and all(len(c) == EXPERTS for c in report.errors)
    assert all(curve[-1] == 0 for curve in report.errors)


def test_the_layer_with_the_larger_error_curve_gets_more_experts() -> None:
    model = _moefied()
    first, second = moe_layers(model)
    with torch.no_grad():  # layer 0: one expert carries nearly all of the output
        first.w_out[1:] *= 0.01
    report = allocate_experts(model, _blocks(), 0.5)
    assert report.errors[0][0] < report.errors[1][0]
    assert report.ks[0] < report.ks[1]


def test_keep_one_keeps_every_expert_and_equals_dense(run, fp32) -> None:
    inputs = tiny_inputs("llama")
    dense = run(tiny_model("llama"), inputs)
    model = _moefied()
    for moe in moe_layers(model):
        moe.selector.set_topk(k=2)
    report = allocate_experts(model, _blocks(), 1.0)
    assert report.ks == (EXPERTS, EXPERTS)
    assert report.flops_share == pytest.approx(1.0)
    torch.testing.assert_close(run(model, inputs), dense, **fp32)


def test_error_curve_matches_masked_outputs() -> None:
    model = _moefied()
    moe = moe_layers(model)[1]
    x = collect_layer_inputs(model, _blocks(4), tokens_per_layer=50)[1]
    assert x.shape == (50, moe.d_model)
    curve = error_curve(moe, x)
    with torch.no_grad():
        dense = moe(x)
        k = 3
        order = layer_scores(moe, x).argsort(dim=-1, descending=True)[:, :k]
        moe.select_next(order)
        partial = moe(x)
    missing = (partial - dense).square().sum(dim=-1)  # (N,)
    expected = missing.sum() / dense.square().sum()
    assert float(curve[k - 1]) == pytest.approx(float(expected), rel=1e-4)
    assert bool((curve[:-1] >= 0).all()) and float(curve[-1]) == 0.0
    # relative to the residual stream: per token, then the mean
    norms = torch.linspace(1.0, 3.0, x.shape[0])
    residual = error_curve(moe, x, norms)
    assert float(residual[k - 1]) == pytest.approx(float((missing / norms).mean()), rel=1e-4)


def test_residual_norms_are_the_block_outputs() -> None:
    model = _moefied()
    blocks = _blocks(2)
    sampled = _collect(model, blocks, tokens_per_layer=10_000, sink_positions=4, residuals=True)
    with torch.no_grad():
        states = model(input_ids=blocks.input_ids, output_hidden_states=True).hidden_states
    for i, (x, norms) in enumerate(sampled):
        assert x.shape == (2 * 20, model.config.hidden_size)
        block_output = states[i + 1][:, 4:]  # (B, T - 4, D) after layer i
        if i == len(sampled) - 1:  # the last hidden state is after the final norm
            continue
        expected = block_output.reshape(-1, block_output.shape[-1]).square().sum(dim=-1)
        torch.testing.assert_close(norms.sort().values, expected.sort().values)


@pytest.mark.parametrize("error", ["residual", "output"])
def test_both_error_measures_allocate_within_the_budget(error: str) -> None:
    model = _moefied()
    report = allocate_experts(model, _blocks(), 0.5, error=error)
    assert report.error == error and report.flops_share <= 0.5
    assert report.to_dict()["ks"] == list(report.ks)


def test_shared_experts_are_never_dropped() -> None:
    model = _moefied()
    layers = moe_layers(model)
    for moe in layers:
        moe.num_shared = 3
    least = _flops_share(model, [3] * len(layers))
    report = allocate_experts(model, _blocks(), least + 1e-9)
    assert report.ks == (3, 3)
    with pytest.raises(MoefyError, match="below the least"):
        allocate_experts(model, _blocks(), least * 0.9)
    # shared experts rank first, so dropping any routed expert leaves them in
    x = collect_layer_inputs(model, _blocks(2), tokens_per_layer=20)[0]
    curve = error_curve(layers[0], x)
    assert bool((curve[2:] <= curve[2]).all())


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5, float("nan"), "0.5", True, None])
def test_bad_keep_is_a_one_line_error(keep) -> None:
    model = _moefied()
    with pytest.raises(MoefyError) as caught:
        allocate_experts(model, _blocks(2), keep)
    assert "\n" not in str(caught.value) and "keep" in str(caught.value)
    assert [m.selector.num_selected() for m in moe_layers(model)] == [EXPERTS, EXPERTS]


def test_bad_rule_and_no_moe_layers_are_errors() -> None:
    with pytest.raises(MoefyError, match="rule"):
        allocate_experts(_moefied(), _blocks(2), 0.5, rule="relative")
    with pytest.raises(MoefyError, match="error"):
        allocate_experts(_moefied(), _blocks(2), 0.5, error="absolute")
    with pytest.raises(MoefyError, match="moefy_"):
        allocate_experts(tiny_model("llama"), _blocks(2), 0.5)


def test_dynamic_rule_reaches_the_allocated_mean_k() -> None:
    model = _moefied()
    blocks = _blocks()
    report = allocate_experts(model, blocks, 0.5, rule=DYNAMIC)
    layers = moe_layers(model)
    assert report.taus is not None and report.mean_experts is not None
    inputs = collect_layer_inputs(model, blocks)
    for moe, x, k, tau, mean in zip(
        layers, inputs, report.ks, report.taus, report.mean_experts, strict=True
    ):
        assert moe.selector.rule == DYNAMIC and moe.selector.tau == tau
        measured = float(moe.selector(x, moe).sum(dim=-1).float().mean())
        assert measured == pytest.approx(mean, abs=0.02)
        assert k - 0.5 <= mean <= k
    assert report.flops_share <= 0.5 + 1e-12
