"""Sweep input checks: bad levels fail before any model loads; a malformed rows.json is a
one-line error of ``moefy report``, not a traceback."""

from __future__ import annotations

import json
import math

import pytest

from moefy.cli.main import main
from moefy.errors import MoefyError
from moefy.sweep import SweepConfig, sweep
from tiny_models import save_tiny_hf_folder, write_word_text


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything loads a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("moefy.models.load.load_model", refuse)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    return save_tiny_hf_folder(root / "model"), write_word_text(root / "text.jsonl")


# (SweepConfig fields, pattern of the one-line error)
BAD_CONFIGS = [
    ({"methods": ("moe-oracle",), "levels": (1.5,)}, r"moe-oracle: a level is the kept share"),
    ({"methods": ("teal",), "levels": (0.0,)}, r"teal: a level is the kept share"),
    ({"methods": ("teal",), "levels": (math.nan,)}, r"teal: a level"),
    ({"methods": ("teal",), "levels": (1e-9,)}, r"sparsity"),
    ({"methods": ("cats",), "method_levels": {"cats": (-0.5,)}}, r"cats: a level"),
    ({"methods": ("drop-attn",), "method_levels": {"drop-attn": (1.5,)}}, r"whole number"),
    ({"methods": ("drop-mlp",), "method_levels": {"drop-mlp": (math.inf,)}}, r"whole number"),
    ({"methods": ("skip",), "method_levels": {"skip": (-1,)}}, r"whole number"),
    ({"methods": ("teal",), "levels": ("0.5",)}, r"levels must be a sequence of numbers"),
    ({"methods": ("teal",), "method_levels": {"teal": 0.5}}, r"levels must be a sequence"),
    ({"methods": ("teal",), "method_levels": {"teal": ()}}, r"no levels given for teal"),
    ({"methods": ("dense", "teal"), "method_levels": {"dense": (0.5,)}}, r"dense takes no levels"),
    ({"methods": ("teal", "teal")}, r"listed more than once: teal"),
    ({"methods": ("teal",), "levels": (0.5, 0.5)}, r"teal level 0.5 is listed more than once"),
    ({"methods": ("dense", "drop-attn"), "levels": (0.5,)}, r"--levels apply to none"),
    ({"methods": ("moe-oracle",), "moe": "no/such/folder"}, r"--moe no/such/folder is not a"),
    ({"methods": ("teal",), "profile": "no/such/profile"}, r"--profile no/such/profile is not"),
]


@pytest.mark.parametrize(("fields", "pattern"), BAD_CONFIGS)
def test_bad_sweep_settings_fail_before_any_model_loads(
    fields, pattern, setting, tmp_path, no_model_loads
):
    model, text = setting
    with pytest.raises(MoefyError, match=pattern) as err:
        config = SweepConfig(model=str(model), **fields)
        sweep(config, tmp_path / "sweep")  # the old code got here and loaded the model
    assert "\n" not in str(err.value)
    assert not (tmp_path / "sweep").exists()


def test_moe_dynk_tau_is_checked_up_front(tmp_path, no_model_loads):
    with pytest.raises(MoefyError, match=r"moe-dynk: a level is tau in \(0, 1\]"):
        SweepConfig(methods=("moe-dynk",), routed=str(tmp_path), method_levels={"moe-dynk": (1.5,)})


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--levels", "2"], "moe-oracle: a level is the kept share of the FFN, in (0, 1]"),
        (["--methods", "dense,drop-attn", "--level", "drop-attn=2.5"], "whole number of layers"),
        (["--level", "teal=0.5", "--level", "teal=0.2"], "--level given twice for teal"),
        (["--data", ""], "no text given (--data '')"),
        (["--data", "   "], "no text given"),
    ],
)
def test_sweep_cli_checks_arguments_before_loading(
    extra, pattern, setting, tmp_path, capsys, no_model_loads
):
    model, text = setting
    argv = ["sweep", "--model", str(model), "--data", str(text), "--block-len", "32"]
    argv += ["--tokens", "256", "--out", str(tmp_path / "sweep"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and pattern in err[0], err
    assert not (tmp_path / "sweep").exists()


GOOD_ROW = {"method": "dense", "level": None, "ffn_flops_fraction": 1.0, "perplexity": 10.0}

# (rows.json text, what the message names)
BAD_TABLES = [
    (json.dumps({"method": "dense"}), "a list of rows expected, found an object"),
    ("null", "a list of rows expected, found null"),
    ('"rows"', "a list of rows expected, found a string"),
    ("[]", "no rows"),
    (json.dumps([["dense", None]]), "row 0 is a list, not an object"),
    (json.dumps([None]), "row 0 is null, not an object"),
    (json.dumps([GOOD_ROW, {"level": 0.5}]), "row 1 has no 'method'"),
    (json.dumps([{"method": "teal"}]), "row 0 has no 'level'"),
    (json.dumps([{**GOOD_ROW, "perplexity": "10.0"}]), "'perplexity' is a string, not a number"),
    (json.dumps([{**GOOD_ROW, "level": [0.5]}]), "'level' is a list, not a number"),
    (json.dumps([{**GOOD_ROW, "method": 3}]), "'method' is a number, not a string"),
    (json.dumps([{**GOOD_ROW, "method": None}]), "'method' is null, not a string"),
    (json.dumps([{**GOOD_ROW, "seconds": True}]), "'seconds' is a boolean, not a number"),
    (json.dumps([{**GOOD_ROW, "kl_to_dense": {"x": 1}}]), "'kl_to_dense' is an object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("[{not json", "Expecting property name"),
]


@pytest.mark.parametrize(("text", "problem"), BAD_TABLES)
def test_report_refuses_a_malformed_rows_file_in_one_line(text, problem, tmp_path, capsys):
    (tmp_path / "rows.json").write_text(text, encoding="utf-8")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{tmp_path / 'rows.json'} is not a moefy sweep table (" in err[0]
    assert problem in err[0] and err[0].endswith("): run moefy sweep again"), err[0]
    assert not (tmp_path / "report.html").exists()


def test_report_refuses_bytes_that_are_not_utf8(tmp_path, capsys):
    (tmp_path / "rows.json").write_bytes(b'[{"method": "\xff"}]')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a moefy sweep table" in err[0]


def test_report_refuses_a_profile_that_is_not_a_folder(tmp_path, capsys):
    (tmp_path / "rows.json").write_text(json.dumps([GOOD_ROW]), encoding="utf-8")
    assert main(["report", str(tmp_path), "--profile", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--profile" in err[0] and "is not a folder" in err[0]
    assert not (tmp_path / "report.html").exists()
