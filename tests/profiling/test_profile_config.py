"""ProfileConfig: validation and the JSON round trip."""

from __future__ import annotations

import json

import pytest

from moefy.errors import MoefyError
from moefy.profiling import ProfileConfig
from moefy.profiling.accumulators import ACTIVE_RULES
from moefy.profiling.config import ACTIVE_RULE_NAMES, PROFILE_CONFIG_VERSION


@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 0},
        {"batch_size": -3},
        {"batch_size": 2.5},
        {"shares": ()},
        {"shares": (0.0,)},
        {"shares": (1.0,)},
        {"shares": (0.5, 1.2)},
        {"shares": (float("nan"),)},
        {"shares": "0.5"},
        {"rms_thresholds": ()},
        {"rms_thresholds": (-0.1,)},
        {"rms_thresholds": (0.0,)},
        {"active_rule": "topk"},
        {"active_share": 0.0},
        {"active_share": 1.0},
        {"active_threshold": -0.5},
        {"chunk_sizes": ()},
        {"chunk_sizes": (0, 4)},
        {"chunk_sizes": (-2,)},
        {"chunk_sizes": (2.5,)},
        {"hot_share": 1.0},
        {"num_hot": -1},
        {"coactivation": "yes"},
        {"version": PROFILE_CONFIG_VERSION + 1},
    ],
)
def test_nonsense_is_refused(bad: dict) -> None:
    with pytest.raises(MoefyError, match="ProfileConfig"):
        ProfileConfig(**bad)


def test_defaults_and_normalisation() -> None:
    config = ProfileConfig(shares=[0.9, 0.5, 0.9], chunk_sizes=[16, 1, 4.0])
    assert config.shares == (0.5, 0.9)
    assert config.chunk_sizes == (1, 4, 16)
    default = ProfileConfig()
    assert default.active_rule == "contribution" and default.active_share == 0.9
    assert default.version == PROFILE_CONFIG_VERSION
    assert default.coactivation is False


def test_json_round_trip() -> None:
    config = ProfileConfig(
        batch_size=3,
        shares=(0.7,),
        rms_thresholds=(0.2, 0.3),
        active_rule="magnitude",
        active_threshold=0.25,
        chunk_sizes=(2, 8),
        hot_share=0.5,
        num_hot=5,
        coactivation=True,
    )
    text = json.dumps(config.to_dict())
    assert ProfileConfig.from_dict(json.loads(text)) == config
    assert ProfileConfig.from_dict(ProfileConfig().to_dict()) == ProfileConfig()


def test_from_dict_refuses_unknown_keys() -> None:
    with pytest.raises(MoefyError, match="batchsize"):
        ProfileConfig.from_dict({"batchsize": 4})
    with pytest.raises(MoefyError):
        ProfileConfig.from_dict([("batch_size", 4)])


def test_every_rule_has_a_handler() -> None:
    assert set(ACTIVE_RULE_NAMES) == set(ACTIVE_RULES)
