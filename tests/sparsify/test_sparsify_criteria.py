"""Each method's criterion against a brute-force computation on the captured activations."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from moefy.arch import find_ffns
from moefy.errors import MoefyError
from moefy.sparsify import (
    CATSConfig,
    CHESSConfig,
    TEALConfig,
    TopKConfig,
    WINAConfig,
    measure,
    sparsify_,
)
from moefy.sparsify.calibrate import run_model, thresholds_for
from moefy.sparsify.wrappers import sparse_modules
from tiny_models import tiny_model

ONE_PASS = {"min_calibration_tokens": 1, "calibration_passes": 1}
SHARE_TOLERANCE = 2e-3  # histogram quantiles vs the exact share of entries below them


@contextlib.contextmanager
def _capture(model, paths, *, output=False):
    """Record (concatenated over calls) the input -- or output -- of the modules at ``paths``."""
    seen = {path: [] for path in paths}
    handles = []
    for path in paths:
        module = model.get_submodule(path)
        if output:
            hook = module.register_forward_hook(lambda _m, _a, out, p=path: seen[p].append(out))
        else:
            hook = module.register_forward_pre_hook(
                lambda _m, args, p=path: seen[p].append(args[0])
            )
        handles.append(hook)
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _run(model, blocks):
    with torch.no_grad():
        for batch in blocks.batches(8):
            run_model(model, batch)


def _flat(tensors):
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])  # (N, C)


def _share_at_or_below(scores, threshold):
    return float((scores <= threshold).double().mean())


def test_teal_threshold_is_the_quantile_of_abs_inputs(calibration_blocks):
    model = tiny_model("llama")
    paths = [s.module_path(p) for s in find_ffns(model) for p in ("gate", "up", "down")]
    with _capture(model, paths) as seen:
        _run(model, calibration_blocks)
    sparsify_(model, TEALConfig(sparsity=0.4, greedy=False, **ONE_PASS), calibration_blocks)
    wrappers = dict(sparse_modules(model))
    assert sorted(wrappers) == sorted(paths)
    probe = torch.randn(5, 7, 64)
    for path in paths:
        x = _flat(seen[path])
        threshold = float(wrappers[path].threshold)
        assert wrappers[path].threshold.shape == ()
        assert _share_at_or_below(x.abs(), threshold) == pytest.approx(0.4, abs=SHARE_TOLERANCE)
        x_probe = probe[..., : x.shape[-1]]
        expected = torch.where(x_probe.abs() > threshold, x_probe, torch.zeros_like(x_probe))
        assert torch.equal(wrappers[path].sparsify_input(x_probe), expected)


def test_wina_criterion_is_activation_times_column_norm(calibration_blocks):
    model = tiny_model("qwen2")
    paths = [s.module_path(p) for s in find_ffns(model) for p in ("gate", "up", "down")]
    with _capture(model, paths) as seen:
        _run(model, calibration_blocks)
    report = sparsify_(
        model, WINAConfig(sparsity=0.5, greedy=False, **ONE_PASS), calibration_blocks
    )
    wrappers = dict(sparse_modules(model))
    criteria = {a.path: a.criterion_threshold for a in report.allocations}
    gen = torch.Generator().manual_seed(0)
    for path in paths:
        weight = wrappers[path].base_layer.weight  # (O, I)
        column_norms = torch.stack(
            [weight[:, i].double().pow(2).sum().sqrt() for i in range(weight.shape[1])]
        ).float()
        criterion = criteria[path]
        torch.testing.assert_close(wrappers[path].threshold, criterion / column_norms)
        scores = _flat(seen[path]).abs() * column_norms
        assert _share_at_or_below(scores, criterion) == pytest.approx(0.5, abs=SHARE_TOLERANCE)
        x_probe = torch.randn(64, weight.shape[1], generator=gen)
        keep = x_probe.abs() * column_norms > criterion
        sparse = wrappers[path].sparsify_input(x_probe)
        assert torch.equal(sparse != 0, keep)


def _gate_activation_and_up(site, x):
    weights = site.weights()
    gate = torch.nn.functional.linear(x, weights.w_gate, weights.b_gate)
    up = torch.nn.functional.linear(x, weights.w_up, weights.b_up)
    return weights.act.base_layer(gate), up, weights  # act is the wrapper now: use the original


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_cats_zeroes_small_gate_activations_and_skips_up_and_down(name, calibration_blocks):
    model = tiny_model(name)
    sites = find_ffns(model)
    ffn_paths = [s.name for s in sites]
    with _capture(model, ffn_paths) as seen:
        _run(model, calibration_blocks)
    sparsify_(model, CATSConfig(sparsity=0.5, **ONE_PASS), calibration_blocks)
    for site in find_ffns(model):
        wrapper = site.part("act")
        x = _flat(seen[site.name])  # (N, D) FFN inputs of the dense model
        with torch.no_grad():
            activation, up, weights = _gate_activation_and_up(site, x)
            threshold = float(wrapper.threshold)
            assert _share_at_or_below(activation.abs(), threshold) == pytest.approx(
                0.5, abs=SHARE_TOLERANCE
            )
            keep = activation.abs() > threshold  # (N, F)
            # brute force: neurons with a small gate activation contribute nothing
            expected = torch.nn.functional.linear(
                activation * keep * up, weights.w_down, weights.b_down
            )
            torch.testing.assert_close(site.module(x), expected)


def test_chess_thresholds_are_per_neuron_from_mean_up_magnitude(calibration_blocks):
    model = tiny_model("mistral")
    ffn_paths = [s.name for s in find_ffns(model)]
    with _capture(model, ffn_paths) as seen:
        _run(model, calibration_blocks)
    report = sparsify_(model, CHESSConfig(sparsity=0.5, **ONE_PASS), calibration_blocks)
    criteria = {a.layer: a.criterion_threshold for a in report.allocations}
    for site in find_ffns(model):
        x = _flat(seen[site.name])
        with torch.no_grad():
            activation, up, _ = _gate_activation_and_up(site, x)
        mean_up = up.abs().double().mean(dim=0).float()  # (F,) E|up_i| over calibration tokens
        wrapper = site.part("act")
        assert wrapper.threshold.shape == (site.weights().d_ff,)
        torch.testing.assert_close(
            wrapper.threshold, criteria[site.index] / mean_up, rtol=1e-5, atol=0
        )
        scores = activation.abs() * mean_up
        share = _share_at_or_below(scores, criteria[site.index])
        assert share == pytest.approx(0.5, abs=SHARE_TOLERANCE)


def test_topk_keeps_the_k_largest_per_token():
    model = tiny_model("gpt2")
    sparsify_(model, TopKConfig(sparsity=0.75))
    gen = torch.Generator().manual_seed(0)
    for _, wrapper in sparse_modules(model):
        assert wrapper.k == 16  # 64 - round(0.75 * 64)
        h = torch.randn(3, 5, 64, generator=gen)
        sparse = wrapper.sparsify_input(h)
        order = h.abs().argsort(dim=-1, descending=True)
        expected = torch.zeros_like(h).scatter(-1, order[..., :16], h.gather(-1, order[..., :16]))
        assert torch.equal(sparse, expected)


def test_measured_sparsity_counts_what_a_kernel_skips(calibration_blocks, held_blocks):
    model = tiny_model("llama")
    sparsify_(model, CATSConfig(sparsity=0.5, **ONE_PASS), calibration_blocks)
    act_paths = [name for name, _ in sparse_modules(model)]
    with _capture(model, act_paths, output=True) as seen:
        measured = measure(model, held_blocks)
    d_model, d_ff = 32, 64
    skipped = dense = 0.0
    for module, path in zip(measured.modules, act_paths, strict=True):
        activation = _flat(seen[path])  # (N, F) after thresholding
        zeros = float((activation == 0).sum())
        assert module.activation_sparsity == pytest.approx(zeros / activation.numel())
        # each zero skips one up row and one down column of d_model weights, of 3 * D * F
        expected = zeros * 2 * d_model / (activation.shape[0] * 3 * d_model * d_ff)
        assert module.weight_sparsity == pytest.approx(expected)
        skipped += zeros * 2 * d_model
        dense += activation.shape[0] * 3 * d_model * d_ff
    assert measured.total == pytest.approx(skipped / dense)
    assert measured.n_tokens == held_blocks.n_tokens


def test_topk_weight_accounting_is_one_third_of_the_activation_share():
    model = tiny_model("llama")
    sparsify_(model, TopKConfig(sparsity=0.5))
    gen = torch.Generator().manual_seed(4)
    from moefy.data.blocks import TokenBlocks

    measured = measure(model, TokenBlocks(torch.randint(3, 128, (4, 16), generator=gen)))
    # only the down projection's columns are skipped: 1/3 of a gated FFN's weights
    assert measured.activation_sparsity == pytest.approx(0.5)
    assert measured.total == pytest.approx(0.5 / 3)


@pytest.mark.parametrize("sinks", [0, 4])
def test_greedy_first_step_is_the_least_error_per_weight(calibration_blocks, sinks):
    config = TEALConfig(sparsity=0.3, greedy_tokens=256, greedy_sink_positions=sinks, **ONE_PASS)
    model = tiny_model("llama")
    report = sparsify_(model, config, calibration_blocks)
    calibration = report.calibration
    wrapped = list(sparse_modules(model))
    by_path = dict(wrapped)
    weights = {path: w.scope_weights for path, w in wrapped}
    # every block skips exactly the target share of its weights
    for layer in {w.layer for _, w in wrapped}:
        allocs = [a for a in report.allocations if a.layer == layer]
        total = sum(weights[a.path] for a in allocs)
        assert sum(a.sparsity * weights[a.path] for a in allocs) / total == pytest.approx(0.3)
    # brute force of the first greedy step of block 0: sparsify one layer alone by one step
    n_sample = math.ceil(config.greedy_tokens / calibration_blocks.block_len)
    from moefy.data.blocks import TokenBlocks

    sample = TokenBlocks(calibration_blocks.input_ids[:n_sample])
    site = find_ffns(model)[0]
    layer_paths = [p for p, w in wrapped if w.layer == 0]
    saved = {p: by_path[p].threshold.clone() for p in by_path}
    for p in by_path:
        by_path[p].threshold.zero_()
    with _capture(model, [site.name], output=True) as seen:
        _run(model, sample)
    dense_out = _flat([t[:, sinks:] for t in seen[site.name]])  # sink positions left out
    costs = []
    for path in layer_paths:
        stored = thresholds_for(calibration.histograms[path], None, config.greedy_step)[1]
        by_path[path].threshold.copy_(stored)
        with _capture(model, [site.name], output=True) as seen:
            _run(model, sample)
        out = _flat([t[:, sinks:] for t in seen[site.name]])
        error = float(((out.double() - dense_out.double()) ** 2).sum())
        costs.append(error / (config.greedy_step * weights[path]))
        by_path[path].threshold.zero_()
    first_step = calibration.trajectories[0][1]  # (W,) shares after one step
    chosen = int(torch.nonzero(first_step)[0])
    assert chosen == min(range(len(costs)), key=costs.__getitem__)
    for p, threshold in saved.items():
        by_path[p].threshold.copy_(threshold)


def test_greedy_error_leaves_out_the_sink_positions():
    from moefy.sparsify.calibrate import output_error

    dense = [torch.zeros(2, 8, 3)]
    out = torch.zeros(2, 8, 3)
    out[:, 0] = 100.0  # a sink position: huge and left out
    out[:, 5] = 1.0
    assert output_error([out], dense, sink_positions=4) == pytest.approx(2 * 3)
    assert output_error([out], dense, sink_positions=0) == pytest.approx(2 * 3 * (1 + 100.0**2))
    # a block no longer than the sinks, and an output without a sequence axis, count whole
    assert output_error([out[:, :4]], [dense[0][:, :4]], sink_positions=4) > 0
    flat = out.reshape(16, 3)
    assert output_error([flat], [torch.zeros(16, 3)], sink_positions=4) == output_error(
        [out], dense, sink_positions=0
    )


def test_greedy_sink_positions_is_checked():
    with pytest.raises(MoefyError, match="greedy_sink_positions"):
        TEALConfig(greedy_sink_positions=-1)
