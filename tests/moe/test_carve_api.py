"""moefy.carve: one call profiles, splits and fits a router; exact with every expert; bad settings
are one-line errors before anything changes."""

from __future__ import annotations

import pytest
import torch

from moefy.carve import CarveConfig, carve_
from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.moe import moe_layers
from tiny_models import VOCAB, tiny_model


def _blocks() -> TokenBlocks:
    gen = torch.Generator().manual_seed(0)
    return TokenBlocks(torch.randint(3, VOCAB, (16, 24), generator=gen))


def test_carve_is_exact_with_every_expert_and_reports_its_steps() -> None:
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
    report = carve_(model, _blocks(), CarveConfig(expert_size=8, shared=0.25, pattern_tokens=64))
    layers = moe_layers(model)
    assert layers and all(m.num_shared == 2 and m.num_experts == 8 for m in layers)
    assert type(layers[0].selector).__name__ == "LstsqRouter"
    assert set(report.seconds) == {"profile", "split", "router", "total"}
    assert report.router is not None and report.n_tokens == 16 * 24
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dense, atol=1e-5)


def test_oracle_carve_keeps_the_oracle_and_a_moefied_model_is_refused() -> None:
    model = tiny_model("llama")
    report = carve_(model, _blocks(), CarveConfig(router="oracle", pattern_tokens=64))
    assert report.router is None
    assert type(moe_layers(model)[0].selector).__name__ == "OracleSelector"
    with pytest.raises(MoefyError, match="moefied already"):
        carve_(model, _blocks())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"shared": 1.0}, "CarveConfig.shared"),
        ({"shared": -0.1}, "CarveConfig.shared"),
        ({"expert_size": 0}, "CarveConfig.expert_size"),
        ({"router": "mlp"}, "fits its router without training"),
        ({"method": "nope"}, "unknown"),
        ({"top_share": 0.0}, "CarveConfig.top_share"),
        ({"pattern_tokens": 0}, "CarveConfig.pattern_tokens"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, message) -> None:
    with pytest.raises(MoefyError, match=message) as error:
        CarveConfig(**settings)
    assert "\n" not in str(error.value)


def test_config_round_trips_through_json() -> None:
    config = CarveConfig(expert_size=16, shared=0.0, router="analytic")
    assert CarveConfig.from_json(config.to_json()) == config
