"""The shared config checks and the one JSON round trip every config inherits."""

from __future__ import annotations

import json

import pytest

from moefy.errors import MoefyError
from moefy.eval.config import EvalConfig
from moefy.finetune.config import FinetuneConfig
from moefy.layers.config import DropConfig, LayerImportanceConfig
from moefy.moe.config import MoEfyConfig
from moefy.profiling.config import ProfileConfig
from moefy.routing.config import RouterConfig
from moefy.validate import (
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_number,
    check_version,
    is_int,
)

# (check, arguments, accepted?)
CASES = [
    (check_int, ("n", 3), {"minimum": 1}, True),
    (check_int, ("n", 0), {"minimum": 1}, False),
    (check_int, ("n", True), {}, False),
    (check_int, ("n", 2.0), {}, False),
    (check_number, ("lr", 1e-3), {"above": 0.0}, True),
    (check_number, ("lr", 0.0), {"above": 0.0}, False),
    (check_number, ("lr", float("nan")), {}, False),
    (check_number, ("wd", 0.0), {"minimum": 0.0}, True),
    (check_fraction, ("share", 0.0), {}, True),
    (check_fraction, ("share", 0.0), {"zero": False}, False),
    (check_fraction, ("share", 1.0), {}, False),
    (check_fraction, ("share", 1.0), {"one": True}, True),
    (check_bool, ("flag", 1), {}, False),
    (check_choice, ("rule", "nonzero"), {"choices": ("nonzero", "magnitude")}, True),
    (check_choice, ("rule", "other"), {"choices": ("nonzero", "magnitude")}, False),
    (check_version, ("Config", 2, 1), {}, False),
    (check_version, ("Config", 1, 2), {}, True),
]


@pytest.mark.parametrize(("check", "args", "kwargs", "accepted"), CASES)
def test_checks(check, args, kwargs, accepted):
    if accepted:
        check(*args, **kwargs)
    else:
        with pytest.raises(MoefyError, match=args[0]):
            check(*args, **kwargs)


def test_is_int_refuses_bools():
    assert is_int(3) and not is_int(True) and not is_int(3.0)


CONFIGS = [
    MoEfyConfig(num_experts=8, method="random"),
    RouterConfig(router="linear", epochs=2),
    ProfileConfig(shares=(0.5, 0.9), chunk_sizes=(1, 4)),
    FinetuneConfig(max_steps=3),
    EvalConfig(tasks=("perplexity", "agreement"), tokens=512),
    DropConfig(attention=(1, 3), blocks=(2,)),
    LayerImportanceConfig(batch_size=2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_json_round_trip(config):
    text = config.to_json()
    assert type(config).from_json(text) == config
    data = json.loads(text)
    assert data["version"] == 1
    # JSON-ready: what to_dict gives is what the JSON file holds
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_newer_version_and_unknown_fields_are_refused(config):
    data = config.to_dict()
    with pytest.raises(MoefyError, match="version"):
        type(config).from_dict({**data, "version": 99})
    with pytest.raises(MoefyError, match="unknown fields"):
        type(config).from_dict({**data, "colour": "blue"})


def test_nested_configs_come_back():
    from moefy.sweep import SweepConfig

    config = SweepConfig(
        methods=("dense", "teal"),
        method_levels={"teal": (0.5, 0.25)},
        eval=EvalConfig(tasks=("perplexity",), tokens=256),
    )
    again = SweepConfig.from_json(config.to_json())
    assert again == config
    assert isinstance(again.eval, EvalConfig) and again.method_levels["teal"] == (0.5, 0.25)
