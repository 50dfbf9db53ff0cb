"""``--keep``: the share of experts kept per token, and the former spellings it replaced
(``--fractions`` of ``splits`` and ``train-routers``, ``--fraction`` of ``finetune``)."""

from __future__ import annotations

import argparse
import json

import pytest

from moefy.cli.main import build_parser, main

# command, former spelling, a value, what it parses to
KEEP_OPTIONS = [
    ("splits", "--fractions", "0.5,0.25", (0.5, 0.25)),
    ("train-routers", "--fractions", "0.125", (0.125,)),
    ("finetune", "--fraction", "0.25", 0.25),
]


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize(("command", "former", "text", "value"), KEEP_OPTIONS)
def test_keep_and_its_former_spelling_fill_the_same_setting(command, former, text, value):
    parser = build_parser()
    new = parser.parse_args([command, "--keep", text])
    old = parser.parse_args([command, former, text])
    assert new.keep == old.keep == value
    assert (new.keep_option, old.keep_option) == ("--keep", former)


@pytest.mark.parametrize(("command", "former", "text", "value"), KEEP_OPTIONS)
def test_help_names_keep_only(command, former, text, value):
    help_text = _subparser(command).format_help()
    assert "--keep" in help_text
    assert former not in help_text


def _one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("spelling", ["--keep", "--fractions"])
def test_splits_names_the_spelling_given(spelling, tmp_path, capsys):
    argv = ["splits", "--methods", "random", spelling, "1.5", "--results", str(tmp_path / "r.json")]
    line = _one_line_error(argv, capsys)
    assert f"{spelling} must lie in (0, 1]" in line


@pytest.mark.parametrize("spelling", ["--keep", "--fractions"])
def test_train_routers_names_the_spelling_given(spelling, tmp_path, capsys):
    argv = [
        "train-routers", spelling, "2", "--out", str(tmp_path / "out"),
        "--results", str(tmp_path / "r.json"),
    ]  # fmt: skip
    line = _one_line_error(argv, capsys)
    assert f"{spelling} and --taus must lie in (0, 1]" in line


@pytest.fixture(scope="module")
def dense_and_text(tmp_path_factory):
    from tiny_models import WORDS, save_tiny_hf_folder

    root = tmp_path_factory.mktemp("keep")
    dense = save_tiny_hf_folder(root / "dense")
    text = root / "text.jsonl"
    text.write_text(
        "".join(json.dumps({"text": " ".join(WORDS[i:] + WORDS[:i]) * 3}) + "\n" for i in range(20))
    )
    return dense, text


@pytest.mark.parametrize("spelling", ["--keep", "--fraction"])
def test_finetune_keep_on_a_dense_model_names_the_spelling_given(
    spelling, dense_and_text, tmp_path, capsys
):
    dense, text = dense_and_text
    argv = [
        "finetune", "--model", str(dense), "--data", str(text), "--block-len", "16",
        "--tokens", "256", "--steps", "1", spelling, "0.5", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    line = _one_line_error(argv, capsys)
    assert f"{spelling} apply to moefied models" in line
