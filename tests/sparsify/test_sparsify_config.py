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
from moefy.sparsify.histogram import (
    add_to_histogram_,
    empty_histogram,
    histogram_quantile,
    histogram_share_at_or_below,
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


def test_histograms_add_up_over_batches():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(10_000, generator=gen)
    whole = add_to_histogram_(empty_histogram(), scores)
    parts = empty_histogram()
    for chunk in scores.split(999):
        add_to_histogram_(parts, chunk)
    assert torch.equal(whole, parts)
