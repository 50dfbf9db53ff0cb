"""The one conversion from keep (share kept) to a threshold method's sparsity, the shared
option parser, and the configs' JSON round trip through ``JsonConfig``."""

from __future__ import annotations

import argparse

import pytest

from moefy.cli import args as cli_args
from moefy.errors import MoefyError
from moefy.jsonconfig import JsonConfig
from moefy.sparsify import TEALConfig, TopKConfig
from moefy.sparsify.config import positive_int, sparsity_for_keep
from moefy.sparsify.methods import registration


@pytest.mark.parametrize(("keep", "sparsity"), [(1.0, 0.0), (0.65, 0.35), (0.5, 0.5), (0.1, 0.9)])
def test_sparsity_for_keep(keep, sparsity):
    assert sparsity_for_keep(keep) == sparsity  # exactly: rounded, no 0.35000000000000003


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_keep_outside_the_unit_interval_is_refused(keep):
    with pytest.raises(MoefyError, match=r"keep must be a number in \(0, 1\]"):
        sparsity_for_keep(keep)


def test_the_sweep_builds_threshold_configs_with_it():
    from moefy.sweep.methods import threshold_config

    config = threshold_config("teal", 0.65)
    assert isinstance(config, TEALConfig) and config.sparsity == 0.35


def test_one_positive_int_for_the_library_and_the_cli():
    assert registration.positive_int is positive_int
    assert positive_int("3") == cli_args.positive_int("3") == 3
    with pytest.raises(ValueError, match="must be > 0, got 0"):
        positive_int("0")
    with pytest.raises(argparse.ArgumentTypeError, match="must be > 0, got 0"):
        cli_args.positive_int("0")
    with pytest.raises(argparse.ArgumentTypeError, match="expected a whole number, got 'x'"):
        cli_args.positive_int("x")


def test_configs_use_the_shared_round_trip():
    config = TEALConfig(sparsity=0.4, greedy=False)
    assert isinstance(config, JsonConfig)
    assert list(config.to_dict())[0] == "method"
    assert TEALConfig.from_json(config.to_json()) == config
    assert TEALConfig.from_dict({"sparsity": 0.4, "greedy": False}) == config
    with pytest.raises(MoefyError, match="TopKConfig.from_dict got a teal config"):
        TopKConfig.from_dict(config.to_dict())
