"""Method variants in the sweep (``teal:attention=true``) and the linear-FLOPs fraction."""

from __future__ import annotations

import json

import pytest

from moefy.cli.main import main
from moefy.errors import MoefyError
from moefy.eval import EvalConfig
from moefy.sweep import SweepConfig, sweep
from moefy.sweep.methods import get_method, split_variant
from tiny_models import tiny_sweep_setting


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return tiny_sweep_setting(tmp_path_factory.mktemp("variants"), seed=1)


def test_split_variant_reads_json_values_and_text():
    assert split_variant("teal") == ("teal", {})
    assert split_variant("teal:attention=true:greedy_step=0.1") == (
        "teal",
        {"attention": True, "greedy_step": 0.1},
    )
    assert split_variant("wina:calibration_passes=1") == ("wina", {"calibration_passes": 1})
    with pytest.raises(MoefyError, match="FIELD=VALUE"):
        split_variant("teal:attention")


def test_variant_errors_are_one_line_and_early():
    with pytest.raises(MoefyError, match="no field"):
        get_method("teal:colour=red")
    with pytest.raises(MoefyError, match="only the training-free"):
        get_method("moe-oracle:k=2")
    with pytest.raises(MoefyError):
        get_method("teal:attention=maybe")  # not a bool
    assert get_method("teal:attention=true").family == "threshold"


def test_attention_variant_is_its_own_curve_with_a_linear_fraction(setting, tmp_path):
    model, text = setting
    config = SweepConfig(
        model=str(model),
        methods=("dense", "teal", "teal:attention=true"),
        levels=(0.5,),
        eval=EvalConfig(data=str(text), tasks=("perplexity",), tokens=512, block_len=32),
        calibration_tokens=1536,
    )
    rows = {(r["method"], r["level"]): r for r in sweep(config, tmp_path / "sweep").rows}
    dense, plain = rows[("dense", None)], rows[("teal", 0.5)]
    attention = rows[("teal:attention=true", 0.5)]
    assert dense["linear_flops_fraction"] == pytest.approx(1.0)
    # FFN-only thresholds leave attention dense: the linear share lies between FFN share and 1
    assert plain["ffn_flops_fraction"] < plain["linear_flops_fraction"] < 1.0
    assert attention["linear_flops_fraction"] < plain["linear_flops_fraction"]


def test_cli_level_for_a_variant(setting, tmp_path, capsys):
    model, text = setting
    code = main(
        [
            "sweep",
            "--model",
            str(model),
            "--data",
            str(text),
            "--tokens",
            "256",
            "--block-len",
            "32",
            "--calibration-tokens",
            "1536",
            "--tasks",
            "perplexity",
            "--methods",
            "dense,teal:attention=true",
            "--level",
            "teal:attention=true=0.6",
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "cli" / "rows.json").read_text())
    assert [(r["method"], r["level"]) for r in rows] == [
        ("dense", None),
        ("teal:attention=true", 0.6),
    ]


def test_threshold_calibration_shows_progress_when_the_sweep_does(setting, tmp_path, capsys):
    model, text = setting
    config = SweepConfig(
        model=str(model),
        methods=("dense", "teal"),
        levels=(0.5,),
        eval=EvalConfig(data=str(text), tasks=("perplexity",), tokens=256, block_len=32),
        calibration_tokens=1536,
    )
    sweep(config, tmp_path / "quiet")
    assert "greedy allocation" not in capsys.readouterr().err
    sweep(config, tmp_path / "shown", progress=True)
    assert "greedy allocation" in capsys.readouterr().err
