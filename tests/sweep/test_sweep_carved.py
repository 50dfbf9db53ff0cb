"""The carved MoE in the sweep: carved on the calibration text (or read from --carved), experts
allocated per layer to the level's share of the FFN FLOPs, its oracle beside it."""

from __future__ import annotations

import pytest

from moefy.cli.main import main
from moefy.errors import MoefyError
from moefy.eval import EvalConfig
from moefy.sweep import SweepConfig, sweep
from tiny_models import tiny_sweep_setting

METHODS = ("dense", "moe-carved", "moe-carved-oracle")
LEVELS = (0.75, 0.5)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return tiny_sweep_setting(tmp_path_factory.mktemp("sweep-carved"), seed=1)


def _config(model, text, **changes) -> SweepConfig:
    settings = {
        "model": str(model),
        "methods": METHODS,
        "levels": LEVELS,
        "eval": EvalConfig(data=str(text), tasks=("perplexity",), tokens=512, block_len=32),
        "calibration_tokens": 1024,
    }
    return SweepConfig(**{**settings, **changes})


def test_carved_rows_meet_their_flops_budget_and_rerun_from_cache(setting, tmp_path):
    model, text = setting
    first = sweep(_config(model, text), tmp_path / "sweep", report=False)
    rows = {(r["method"], r["level"]): r for r in first.rows}
    assert first.computed == 1 + len(LEVELS) * 2
    for method in ("moe-carved", "moe-carved-oracle"):
        for level in LEVELS:
            row = rows[(method, level)]
            # the budget counts the router and allows at most one expert step (1/8 of a layer)
            assert row["ffn_flops_fraction"] <= level + 1e-6, (method, level, row)
            assert row["ffn_flops_fraction"] >= level - 0.13, (method, level, row)
            assert row["perplexity"] > 0
    # fewer FLOPs never come for free: the sparser level is not better than the denser one
    for method in ("moe-carved", "moe-carved-oracle"):
        assert (
            rows[(method, 0.5)]["ffn_flops_fraction"] < rows[(method, 0.75)]["ffn_flops_fraction"]
        )
    again = sweep(_config(model, text), tmp_path / "sweep", report=False)
    assert again.computed == 0


def test_carved_folder_must_be_a_moefied_model(setting, tmp_path, capsys):
    model, text = setting
    with pytest.raises(MoefyError, match="--carved .* is not a moefied model"):
        _config(model, text, carved=str(model))
    code = main(
        [
            "sweep",
            "--model",
            str(model),
            "--data",
            str(text),
            "--methods",
            "dense,moe-carved",
            "--carved",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "--carved" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
