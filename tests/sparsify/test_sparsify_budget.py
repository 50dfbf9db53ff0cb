"""Budgets of the layerwise methods: block, global and tail meet the target in measured FLOPs,
global follows measured error across blocks, tail is a deterministic prior, overheads are paid."""

from __future__ import annotations

import pytest
import torch

from moefy.errors import MoefyError
from moefy.sparsify import TEALConfig, WINAConfig, measure, sparsify_, unsparsify
from moefy.sparsify.budget import global_block_sparsities, tail_exponent, tail_shares
from moefy.sparsify.methods.registration import budget_choice
from moefy.sparsify.methods.teal import TEALHandler
from moefy.sparsify.wrappers import sparse_modules
from tiny_models import tiny_inputs, tiny_model

TARGET_TOLERANCE = 0.015  # measured on held text, as test_sparsify_calibration does
FAST = dict(greedy_tokens=64, greedy_step=0.1)  # a short search


def _net_skipped(model, held_blocks) -> float:
    """Share of the wrappers' weight reads skipped on held text, net of their overheads."""
    measured = measure(model, held_blocks)
    wrappers = dict(sparse_modules(model))
    skipped = dense = 0.0
    for module in measured.modules:
        dense += module.scope_weights * module.tokens
        overhead = wrappers[module.path].overhead_weights * module.tokens
        skipped += module.weight_sparsity * module.scope_weights * module.tokens - overhead
    return skipped / dense


def _layer_shares(model, config, blocks) -> dict[int, float]:
    """Sparsify ``model``; the weight-weighted share each block was allocated."""
    report = sparsify_(model, config, blocks)
    totals: dict[int, list[float]] = {}
    for allocation, (_, wrapper) in zip(report.allocations, sparse_modules(model), strict=True):
        pair = totals.setdefault(allocation.layer, [0.0, 0.0])
        pair[0] += allocation.sparsity * wrapper.scope_weights
        pair[1] += wrapper.scope_weights
    return {layer: s / w for layer, (s, w) in totals.items()}


def _power_law(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix whose singular values fall as a power law: a heavy tail."""
    u, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen))
    return u @ torch.diag(torch.arange(1, cols + 1, dtype=torch.float32) ** -1.5) @ v.T


@pytest.mark.parametrize(
    "config",
    [
        TEALConfig(sparsity=0.5, budget="block", **FAST),
        TEALConfig(sparsity=0.5, budget="global", **FAST),
        TEALConfig(sparsity=0.5, budget="tail"),
        WINAConfig(sparsity=0.4, budget="global", attention=True, **FAST),
    ],
    ids=["block", "global", "tail", "wina-global-attention"],
)
def test_every_budget_meets_the_target_in_measured_flops(config, calibration_blocks, held_blocks):
    model = tiny_model("llama")
    report = sparsify_(model, config, calibration_blocks)
    assert _net_skipped(model, held_blocks) == pytest.approx(config.sparsity, abs=TARGET_TOLERANCE)
    shares = [a.sparsity for a in report.allocations]
    if config.budget != "block":  # the budget moves between projections and blocks
        assert max(shares) - min(shares) > 0.02


def test_global_spends_where_the_error_is_small(calibration_blocks, held_blocks):
    """Block 0's FFN dwarfs its residual stream (fragile), block 1's barely touches it."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(30.0)
        model.model.layers[1].mlp.down_proj.weight.mul_(0.03)
    block = _layer_shares(model, TEALConfig(sparsity=0.5, **FAST), calibration_blocks)
    unsparsify(model)
    config = TEALConfig(sparsity=0.5, budget="global", **FAST)
    spread = _layer_shares(model, config, calibration_blocks)
    assert block[0] == pytest.approx(0.5, abs=1e-9) and block[1] == pytest.approx(0.5, abs=1e-9)
    assert spread[0] < 0.4 < 0.6 < spread[1]
    assert (spread[0] + spread[1]) / 2 == pytest.approx(0.5, abs=1e-9)  # blocks of equal size
    assert _net_skipped(model, held_blocks) == pytest.approx(0.5, abs=TARGET_TOLERANCE)


@pytest.mark.parametrize("budget", ["global", "tail"])
def test_a_reused_calibration_gives_the_thresholds_of_a_fresh_run(budget, calibration_blocks):
    config = TEALConfig(sparsity=0.6, budget=budget, **FAST)
    model = tiny_model("llama")
    first = sparsify_(model, config, calibration_blocks)
    unsparsify(model)
    lower = config.replace(sparsity=0.35)
    sparsify_(model, lower, calibration_blocks, calibration=first.calibration)
    reused = {path: w.threshold.clone() for path, w in sparse_modules(model)}
    unsparsify(model)
    sparsify_(model, lower, calibration_blocks)
    for path, wrapper in sparse_modules(model):
        torch.testing.assert_close(wrapper.threshold, reused[path])
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_inputs("llama"))[0]).all()


def test_water_filling_prefers_cheap_blocks_and_lower_budgets_are_prefixes():
    skipped = {0: torch.tensor([0.0, 1.0, 2.0, 3.0]), 1: torch.tensor([0.0, 1.0, 2.0, 3.0])}
    errors = {0: torch.tensor([0.0, 1.0, 3.0, 6.0]), 1: torch.tensor([0.0, 2.0, 4.0, 6.0])}
    assert global_block_sparsities(skipped, errors, 1.0) == {0: 1.0, 1: 0.0}
    assert global_block_sparsities(skipped, errors, 3.0) == {0: 2.0, 1: 1.0}
    assert global_block_sparsities(skipped, errors, 3.5) == {0: 2.0, 1: 1.5}
    bumpy = {0: torch.tensor([0.0, 5.0, 1.0, 2.0])}  # a noisy rise is bridged by the hull
    assert global_block_sparsities({0: skipped[0]}, bumpy, 2.0) == {0: 2.0}


def test_tail_rule_is_deterministic_and_follows_the_exponents():
    gen = torch.Generator().manual_seed(0)
    assert tail_exponent(_power_law(64, 32, gen)) < tail_exponent(
        torch.randn(64, 32, generator=gen)
    )
    model = tiny_model("llama")
    wrappers = [w for _, w in TEALHandler().install(model, TEALConfig())]
    with torch.no_grad():  # give one projection a power-law spectrum: it must skip the least
        weight = wrappers[0].base_layer.weight  # (O, I)
        weight.copy_(_power_law(*weight.shape, gen) * weight.norm() / 3)
    shares = tail_shares(wrappers, 0.5)
    assert shares == tail_shares(wrappers, 0.5)
    assert shares[0] == min(shares)
    scope = [w.scope_weights for w in wrappers]
    assert sum(s * w for s, w in zip(shares, scope, strict=True)) / sum(scope) == pytest.approx(0.5)


def test_overhead_is_paid_for_and_an_unpayable_one_is_refused(calibration_blocks, held_blocks):
    for budget in ("block", "global", "tail"):
        model = tiny_model("llama")
        config = TEALConfig(sparsity=0.4, budget=budget, **FAST)
        handler = TEALHandler()
        wrapped = handler.install(model, config)
        for _, wrapper in wrapped:
            wrapper.overhead_weights = wrapper.scope_weights // 10  # 10 % more skipped
        allocations, calibration = handler.calibrate(
            model, wrapped, config, calibration_blocks, None, False
        )
        scope = [w.scope_weights for _, w in wrapped]
        raw = sum(a.sparsity * s for a, s in zip(allocations, scope, strict=True)) / sum(scope)
        assert raw == pytest.approx(0.5, abs=1e-3), budget  # overheads rounded down
        assert _net_skipped(model, held_blocks) == pytest.approx(0.4, abs=TARGET_TOLERANCE)
        for _, wrapper in wrapped:
            wrapper.overhead_weights = wrapper.scope_weights * 7 // 10  # 0.4 + 0.7 > 1
        with pytest.raises(MoefyError, match="rank too high for this sparsity"):
            handler.allocate(model, wrapped, config, calibration_blocks, calibration, False)


def test_bad_budgets_are_refused():
    with pytest.raises(MoefyError, match="budget must be one of block, global, tail"):
        TEALConfig(budget="layer")
    with pytest.raises(MoefyError, match="keep greedy on"):
        TEALConfig(budget="global", greedy=False)
    with pytest.raises(ValueError, match="expected one of block, global, tail"):
        budget_choice("everywhere")
    assert TEALConfig.from_json(TEALConfig(budget="tail").to_json()).budget == "tail"
