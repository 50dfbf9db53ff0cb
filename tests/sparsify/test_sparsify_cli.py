"""``moefy sparsify`` end to end on a tiny local model folder and a text file."""

from __future__ import annotations

import argparse
import importlib
import json

import pytest
import torch

from moefy.cli import sparsify_cmd
from moefy.errors import MoefyError
from moefy.sparsify import TEALConfig, load_sparse, sparsify_config_of
from tiny_models import save_tiny_hf_folder

WORDS = (
    "the market bank shares film music game team player election minister phone software".split()
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moefy sparsify")
    sparsify_cmd.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder = save_tiny_hf_folder(root / "model", "llama")
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(WORDS), (4000,), generator=gen).tolist()
    lines = [" ".join(WORDS[i] for i in picks[k : k + 20]) for k in range(0, len(picks), 20)]
    text = root / "text.txt"
    text.write_text("\n".join(lines) + "\n")
    return folder, text


def test_sparsify_command_measures_and_saves(model_and_text, tmp_path, capsys):
    folder, text = model_and_text
    out = tmp_path / "teal50"
    args = _parse(
        [
            "--model",
            str(folder),
            "--data",
            str(text),
            "--method",
            "teal",
            "--sparsity",
            "0.5",
            "--tokens",
            "1024",
            "--eval-tokens",
            "256",
            "--block-len",
            "32",
            "--no-greedy",
            "--out",
            str(out),
        ]
    )
    assert sparsify_cmd.run(args) == 0
    printed = capsys.readouterr().out
    assert "total" in printed and "perplexity: dense" in printed
    model = load_sparse(out)
    assert sparsify_config_of(model) == TEALConfig(sparsity=0.5, greedy=False)
    report = json.loads((out / "sparsify_report.json").read_text())
    assert report["measured_weight_sparsity"] == pytest.approx(0.5, abs=0.05)
    assert report["perplexity_sparse"] > 0 and report["perplexity_dense"] > 0
    assert (out / "tokenizer.json").is_file()


def test_options_of_other_methods_are_refused(model_and_text, tmp_path):
    folder, text = model_and_text
    args = _parse(["--model", str(folder), "--data", str(text), "--method", "cats", "--attention"])
    with pytest.raises(MoefyError, match=r"cats takes no --attention \(.*apply to .*teal.* only\)"):
        sparsify_cmd.run(args)


def test_short_calibration_text_is_refused_before_the_dense_pass(
    model_and_text, tmp_path, monkeypatch
):
    def no_perplexity(*args, **kwargs):
        raise AssertionError("the dense perplexity ran before the calibration text was checked")

    module = importlib.import_module("moefy.eval.perplexity")  # moefy.eval.perplexity: a function
    monkeypatch.setattr(module, "perplexity", no_perplexity)
    folder, text = model_and_text
    out = tmp_path / "cats"
    argv = ["--model", str(folder), "--data", str(text), "--method", "cats", "--tokens", "64"]
    args = _parse([*argv, "--block-len", "32", "--out", str(out)])
    with pytest.raises(MoefyError, match=r"has 64 tokens, fewer than the 1024 cats.*--tokens"):
        sparsify_cmd.run(args)
    assert not out.exists()


@pytest.mark.parametrize("value", ["1", "-0.2", "half"])
def test_sparsity_outside_unit_interval_is_a_usage_error(value):
    with pytest.raises(SystemExit):
        _parse(["--sparsity", value])
