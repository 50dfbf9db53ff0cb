"""MoEfyConfig: validation, JSON round trip, and the expert layout (padding) it implies."""

from __future__ import annotations

import pytest

from moefy.errors import MoefyError
from moefy.moe import MoEfyConfig


def test_json_round_trip() -> None:
    cfg = MoEfyConfig(num_experts=64, method="coactivation", seed=3, size_multiple=8)
    assert MoEfyConfig.from_json(cfg.to_json()) == cfg
    assert MoEfyConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # neither experts nor size
        {"num_experts": 8, "expert_size": 8},
        {"num_experts": 0},
        {"num_experts": -2},
        {"num_experts": 2.5},
        {"expert_size": 0},
        {"num_experts": 8, "method": "kmeans-constrained"},
        {"num_experts": 8, "size_multiple": 0},
        {"expert_size": 12, "size_multiple": 8},
        {"num_experts": 8, "version": 99},
        {"num_experts": 8, "max_padding_fraction": 1.5},
    ],
)
def test_invalid_configs_raise(kwargs: dict) -> None:
    with pytest.raises(MoefyError):
        MoEfyConfig(**kwargs)


def test_unknown_field_in_json_raises() -> None:
    with pytest.raises(MoefyError, match="unknown field"):
        MoEfyConfig.from_dict({"num_experts": 4, "experts": 4})
    with pytest.raises(MoefyError, match="JSON"):
        MoEfyConfig.from_json("{not json")


def test_layout_divisible() -> None:
    layout = MoEfyConfig(num_experts=128).layout(11008)
    assert (layout.num_experts, layout.expert_size, layout.padding) == (128, 86, 0)
    assert set(layout.real_sizes) == {86}


def test_layout_pads_evenly_when_not_divisible() -> None:
    layout = MoEfyConfig(num_experts=10).layout(64)  # 64 = 4*7 + 6*6
    assert layout.expert_size == 7
    assert layout.padding == 6
    assert sorted(set(layout.real_sizes)) == [6, 7] and sum(layout.real_sizes) == 64


def test_layout_size_multiple_rounds_up() -> None:
    layout = MoEfyConfig(num_experts=128, size_multiple=8).layout(11008)
    assert layout.expert_size == 88 and layout.padding == 128 * 88 - 11008


def test_layout_from_expert_size() -> None:
    layout = MoEfyConfig(expert_size=16).layout(64)
    assert (layout.num_experts, layout.expert_size, layout.padding) == (4, 16, 0)


def test_too_many_experts_raises() -> None:
    with pytest.raises(MoefyError, match="exceeds d_ff"):
        MoEfyConfig(num_experts=65).layout(64)


def test_wasteful_padding_raises_with_suggestions() -> None:
    # 60 experts of 2 slots pad 64 neurons with 56 zero neurons.
    with pytest.raises(MoefyError, match=r"num_experts=\d+ \(expert_size=\d+\)"):
        MoEfyConfig(num_experts=60).layout(64)
    with pytest.raises(MoefyError, match="max_padding_fraction"):
        MoEfyConfig(num_experts=64, size_multiple=16).layout(1536)  # 24 -> 32 slots
