"""moefy sweep on a tiny model: every pair evaluated once, a rerun does no work, the report
holds one curve per method, errors are one line."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from moefy.cli.main import main
from moefy.errors import MoefyError
from moefy.eval import EvalConfig
from moefy.sweep import SweepConfig, sweep
from tiny_models import tiny_sweep_setting

METHODS = ("dense", "moe-oracle", "topk", "teal")
LEVELS = (0.5, 0.25)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A tiny llama folder and a text of documents made of its tokenizer's words."""
    return tiny_sweep_setting(tmp_path_factory.mktemp("sweep"), seed=0)


def _config(model, text, methods=METHODS) -> SweepConfig:
    return SweepConfig(
        model=str(model),
        methods=methods,
        levels=LEVELS,
        eval=EvalConfig(
            data=str(text),
            tasks=("perplexity", "agreement"),
            tokens=512,
            agreement_tokens=128,
            block_len=32,
        ),
        calibration_tokens=1536,
        experts=4,
    )


def _curves(report_html: str) -> dict:
    found = re.search(
        r'<script type="application/json" id="moefy-curves">(.*?)</script>', report_html, re.S
    )
    assert found, "the report embeds its curves"
    return json.loads(found.group(1))


def test_sweep_then_cached_rerun_does_no_work(setting, tmp_path):
    model, text = setting
    config = _config(model, text)
    first = sweep(config, tmp_path / "sweep")
    assert first.computed == len(config.plan()) == 1 + 3 * len(LEVELS)
    assert [(r["method"], r["level"]) for r in first.rows] == config.plan()
    dense = first.rows[0]
    assert dense["ffn_flops_fraction"] == 1.0 and dense["top1_agreement"] == 1.0
    oracle = {r["level"]: r for r in first.rows if r["method"] == "moe-oracle"}
    assert oracle[0.5]["ffn_flops_fraction"] == pytest.approx(0.5, abs=0.02)
    assert oracle[0.25]["ffn_flops_fraction"] == pytest.approx(0.25, abs=0.02)
    teal = {r["level"]: r for r in first.rows if r["method"] == "teal"}
    assert teal[0.25]["ffn_flops_fraction"] < teal[0.5]["ffn_flops_fraction"] < 1.0
    assert teal[0.25]["measured_sparsity"] > teal[0.5]["measured_sparsity"] > 0.0
    assert "measured_sparsity" not in dense

    again = sweep(config, tmp_path / "sweep")
    assert again.computed == 0
    assert again.rows == first.rows

    shown = []  # the rows this run evaluated, as the sweep hands them over one by one
    wider = sweep(
        _config(model, text, METHODS + ("cats",)), tmp_path / "sweep", on_row=shown.append
    )
    assert wider.computed == len(LEVELS)  # only the new method's levels
    assert sorted((r["method"], r["level"]) for r in shown) == [("cats", v) for v in sorted(LEVELS)]


def test_report_has_one_curve_per_method(setting, tmp_path):
    model, text = setting
    result = sweep(_config(model, text), tmp_path / "sweep")
    page = result.report.read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # self-contained
    for metric, per_method in _curves(page).items():
        assert sorted(per_method) == sorted(METHODS), metric
        for method, points in per_method.items():
            assert len(points) == (1 if method == "dense" else len(LEVELS)), (metric, method)
    rows = json.loads((tmp_path / "sweep" / "rows.json").read_text())
    assert len(rows) == len(result.rows)


def test_sweep_cli_prints_table_headline_and_report(setting, tmp_path, capsys):
    model, text = setting
    out = tmp_path / "cli"
    args = ["sweep", "--model", str(model), "--data", str(text), "--tokens", "512"]
    args += ["--agreement-tokens", "128", "--block-len", "32", "--methods", "dense,topk"]
    args += ["--levels", "0.5,0.25", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "within 50% of dense FFN FLOPs" in printed
    assert (out / "report.html").is_file()
    assert main(["report", str(out)]) == 0  # rebuilds the page from rows.json


def test_errors_are_one_line(setting, tmp_path, capsys):
    model, text = setting
    with pytest.raises(MoefyError, match="unknown"):
        SweepConfig(methods=("dense", "nonsense"))
    with pytest.raises(MoefyError, match="not among the methods"):
        SweepConfig(methods=("dense",), method_levels={"teal": (0.5,)})
    with pytest.raises(MoefyError, match="level"):
        sweep(
            _config(model, text, ("dense", "moe-oracle")).__class__(
                model=str(model),
                methods=("moe-oracle",),
                levels=(1.5,),
                eval=_config(model, text).eval,
                experts=4,
            ),
            tmp_path / "bad",
        )
    code = main(
        [
            "sweep",
            "--model",
            str(model),
            "--data",
            str(text),
            "--methods",
            "moe-mlp",
            "--tokens",
            "512",
            "--block-len",
            "32",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--routed" in err[0]


def test_short_calibration_text_is_refused_before_any_evaluation(setting, tmp_path, monkeypatch):
    def no_evaluation(*args, **kwargs):
        raise AssertionError("a model was evaluated before the calibration text was checked")

    monkeypatch.setattr("moefy.eval.harness.evaluate", no_evaluation)
    model, text = setting
    config = dataclasses.replace(_config(model, text, ("dense", "cats")), calibration_tokens=64)
    with pytest.raises(MoefyError, match=r"fewer than the 1024 cats needs.*--calibration-tokens"):
        sweep(config, tmp_path / "short")
    assert not (tmp_path / "short" / "rows.json").exists()


def test_evaluate_cli_writes_the_report(setting, tmp_path, capsys):
    model, text = setting
    out = tmp_path / "eval.json"
    common = ["--data", str(text), "--tokens", "256", "--block-len", "32"]
    args = ["evaluate", "--model", str(model), "--dense", str(model), *common]
    args += ["--tasks", "perplexity,agreement", "--agreement-tokens", "64", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["row"]["top1_agreement"] == 1.0
    assert report["row"]["ffn_flops_fraction"] == 1.0
    assert report["lm"]["n_tokens"] == 8 * 31
    capsys.readouterr()
    code = main(["evaluate", "--model", str(model), *common, "--tasks", "agreement"])
    assert code == 2
    assert "--dense" in capsys.readouterr().err.strip().splitlines()[-1]


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    (tmp_path / "rows.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "is not a moefy sweep table" in err[1]
