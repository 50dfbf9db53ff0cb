"""Configs: validation, JSON round trip, dispatch; histograms: quantiles against exact ones."""

from __future__ import annotations

import pytest
import torch

from moefy.errors import MoefyError
from moefy.sparsify import (
    CONFIG_CLASSES,
    HANDLERS,
    CATSConfig,
    CHESSConfig,
    TEALConfig,
    TopKConfig,
    WINAConfig,
    config_from_dict,
    config_from_json,
)
from moefy.sparsify.centring import CentredThresholdLinear
from moefy.sparsify.histogram import (
    BINS_PER_OCTAVE,
    LOG2_HIGH,
    LOG2_LOW,
    NUM_BINS,
    add_to_histogram_,
    bin_indices,
    empty_histogram,
    histogram_quantile,
    histogram_share_at_or_below,
)
from moefy.sparsify.lowrank import LowRankLinear
from moefy.sparsify.wrappers import (
    ThresholdActivation,
    ThresholdLinear,
    TopKLinear,
    counters_paused,
)

ALL_CONFIGS = [
    TopKConfig(sparsity=0.3),
    TEALConfig(sparsity=0.5, attention=True, greedy=False, calibration_passes=3),
    WINAConfig(sparsity=0.65, greedy_step=0.1, greedy_tokens=64),
    CATSConfig(sparsity=0.4, batch_size=2),
    CHESSConfig(sparsity=0.0, min_calibration_tokens=16),
]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: c.method)
def test_json_round_trip(config):
    again = config_from_json(config.to_json())
    assert again == config and type(again) is type(config)
    assert config.to_dict()["method"] == config.method
    assert config.to_dict()["version"] == 1


def test_every_method_has_one_config_and_one_handler():
    assert set(CONFIG_CLASSES) == {
        "topk",
        "teal",
        "wina",
        "cats",
        "chess",
        "scap",
        "rotate",
        "lowrank",
    }
    assert set(HANDLERS) == set(CONFIG_CLASSES.values())


@pytest.mark.parametrize("cls", list(CONFIG_CLASSES.values()), ids=lambda c: c.method)
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), True, "0.5"])
def test_sparsity_outside_unit_interval_is_refused(cls, sparsity):
    with pytest.raises(MoefyError, match=r"sparsity must be a number in \[0, 1\)"):
        cls(sparsity=sparsity)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: TEALConfig(batch_size=0), "batch_size"),
        (lambda: TEALConfig(greedy_step=0.0), "greedy_step"),
        (lambda: TEALConfig(greedy="yes"), "greedy"),
        (lambda: CATSConfig(calibration_passes=0), "calibration_passes"),
        (lambda: CHESSConfig(version=99), "upgrade moefy"),
        (lambda: config_from_dict({"method": "magic", "sparsity": 0.5}), "unknown sparsify method"),
        (lambda: config_from_dict({"method": "cats", "attention": True}), "no field"),
        (lambda: config_from_json("{not json"), "not valid JSON"),
    ],
)
def test_bad_configs_say_what_is_wrong(make, pattern):
    with pytest.raises(MoefyError, match=pattern):
        make()


def test_histogram_quantiles_match_exact_quantiles():
    gen = torch.Generator().manual_seed(0)
    # heavy-tailed magnitudes over several octaves, plus exact zeros
    scores = torch.cat([torch.randn(200_000, generator=gen).abs() ** 3, torch.zeros(1000)])
    counts = add_to_histogram_(empty_histogram(), scores)
    assert counts.sum() == scores.numel()
    for share in (0.1, 0.25, 0.5, 0.65, 0.9):
        threshold = histogram_quantile(counts, share)
        exact_share = float((scores <= threshold).double().mean())
        assert exact_share == pytest.approx(share, abs=1e-3)
        assert histogram_share_at_or_below(counts, threshold) == pytest.approx(share, abs=1e-6)
    assert histogram_quantile(counts, 0.0) == 0.0
    assert histogram_quantile(counts, 0.004) == 0.0  # inside the zeros: keep every non-zero entry


def test_histogram_bins_from_bits_match_the_octave_definition():
    """The bit-shift binning equals 1 + (octave - LOG2_LOW) * parts + floor(part) in float64."""
    import math

    gen = torch.Generator().manual_seed(2)
    scores = torch.cat(
        [
            torch.exp(torch.empty(50_000).uniform_(-25, 12, generator=gen)),
            torch.tensor([0.0, 2.0**LOG2_LOW, 2.0**LOG2_HIGH, 1.0, 1.5, float("inf")]),
            torch.tensor([2.0 ** (LOG2_LOW - 1), 2.0**LOG2_HIGH * 0.999]),
        ]
    )
    expected = []
    for value in scores.double().tolist():
        if value < 2.0**LOG2_LOW:
            expected.append(0)
        elif value >= 2.0**LOG2_HIGH:
            expected.append(NUM_BINS - 1)
        else:
            mantissa, exponent = math.frexp(value)
            part = math.floor((2 * mantissa - 1) * BINS_PER_OCTAVE)
            expected.append(1 + (exponent - 1 - LOG2_LOW) * BINS_PER_OCTAVE + part)
    assert bin_indices(scores).tolist() == expected
    assert bin_indices(torch.tensor([float("nan")])).tolist() == [NUM_BINS - 1]


def test_histograms_add_up_over_batches():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(10_000, generator=gen)
    whole = add_to_histogram_(empty_histogram(), scores)
    parts = empty_histogram()
    for chunk in scores.split(999):
        add_to_histogram_(parts, chunk)
    assert torch.equal(whole, parts)


@pytest.mark.parametrize(
    "make",
    [
        lambda base: ThresholdLinear(base, layer=0, role="down_proj", per_channel=True),
        lambda base: TopKLinear(base, layer=0, role="down_proj", k=4),
        lambda base: ThresholdActivation(
            base, layer=0, role="act_fn", d_model=8, d_ff=16, per_channel=True
        ),
        lambda base: CentredThresholdLinear(base, layer=0, role="down_proj"),
        lambda base: LowRankLinear(base, layer=0, role="down_proj", rank=2),
    ],
    ids=["threshold", "topk", "activation", "centred", "lowrank"],
)
def test_wrapper_buffers_live_on_the_wrapped_layers_device(make):
    # a model already on the GPU gets wrappers whose thresholds and counters are there too
    # (the meta device stands in for it: the CPU default would show up as "cpu")
    base = torch.nn.Linear(16, 8, device="meta")
    wrapper = make(base)
    devices = {name: buffer.device.type for name, buffer in wrapper.named_buffers()}
    assert devices and set(devices.values()) == {"meta"}, devices


@pytest.mark.parametrize("tokens", [1, 64], ids=["kernel-sized", "masked-path"])
@pytest.mark.parametrize(
    "make", [ThresholdLinear, CentredThresholdLinear], ids=["plain", "centred"]
)
def test_counters_paused_leaves_every_counter_alone_on_both_paths(make, tokens):
    wrapper = make(torch.nn.Linear(64, 32), layer=0, role="down_proj")
    wrapper.threshold.fill_(0.5)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), counters_paused():
        paused = wrapper(x)
    assert [int(b) for b in (wrapper.zeros_seen, wrapper.entries_seen, wrapper.tokens_seen)] == [
        0,
        0,
        0,
    ]
    with torch.no_grad():
        counted = wrapper(x)
    torch.testing.assert_close(paused, counted)
    assert int(wrapper.entries_seen) == 64 * tokens and int(wrapper.tokens_seen) == tokens
    assert 0 < int(wrapper.zeros_seen) < 64 * tokens
