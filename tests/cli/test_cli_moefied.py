"""A moefied folder given to commands that start from a dense model: ``profile`` measures its
experts' neurons, ``sparsify``, ``splits`` and ``convert`` refuse it before any evaluation, and
every message speaks the CLI's words, not the Python API's."""

from __future__ import annotations

import importlib

import pytest
import torch

from moefy.cli.main import main
from moefy.errors import MoefyError
from moefy.profiling import SparsityProfile
from tiny_models import save_tiny_hf_folder, write_word_text

COMMON = ["--block-len", "32", "--device", "cpu"]
# Python-API phrases a CLI user cannot act on
API_WORDS = ("unmoefy(model)", "profile=", "pass ", "call ", "min_calibration_tokens")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny dense llama folder, its moefied (moefy convert) and sparsified copies, a text."""
    root = tmp_path_factory.mktemp("moefied")
    dense = save_tiny_hf_folder(root / "dense")
    text = write_word_text(root / "text.jsonl", docs=200)
    moe = root / "moe"
    assert main(["convert", "--model", str(dense), "--experts", "4", "--out", str(moe)]) == 0
    sparse = root / "sparse"
    argv = ["sparsify", "--model", str(dense), "--data", str(text), "--method", "topk"]
    assert main([*argv, "--eval-tokens", "256", *COMMON, "--out", str(sparse)]) == 0
    return {"dense": dense, "moe": moe, "sparse": sparse, "text": text}


@pytest.fixture
def no_evaluation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was evaluated before it was checked")

    # Modules that bind perplexity at import bind the real one before it is patched.
    for module in ("moefy.eval", "moefy.moe.quality", "moefy.routing.quality"):
        importlib.import_module(module)
    # the module, not the function moefy.eval exports under the same name
    monkeypatch.setattr(importlib.import_module("moefy.eval.perplexity"), "perplexity", refuse)
    monkeypatch.setattr("moefy.moe.quality.split_quality", refuse)


def _error_line(argv, capsys):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert not any(words in err[0] for words in API_WORDS), err[0]
    return err[0]


def test_profile_of_a_moefied_folder_measures_its_experts(folders, tmp_path):
    profiles = {}
    for name in ("dense", "moe"):
        out = tmp_path / name
        argv = ["profile", "--model", str(folders[name]), "--data", str(folders["text"])]
        assert main([*argv, "--tokens", "512", "--no-plots", *COMMON, "--out", str(out)]) == 0
        profiles[name] = SparsityProfile.load(out)
    dense, moe = profiles["dense"], profiles["moe"]
    # the FFN stack of the dense model, so the profile serves moefy convert of that model
    for key in ("model_type", "num_layers", "d_model", "d_ff"):
        assert moe.fingerprint[key] == dense.fingerprint[key], key
    assert moe.num_layers == dense.num_layers == 2 and moe.n_tokens == dense.n_tokens == 512
    for layer in range(dense.num_layers):
        # every expert together is the dense FFN, so each neuron fires as it did there
        torch.testing.assert_close(moe.firing_frequency(layer), dense.firing_frequency(layer))


@pytest.mark.parametrize(
    ("command", "folder", "pattern"),
    [
        ("sparsify", "moe", "is a moefied model: sparsify the dense model"),
        ("sparsify", "sparse", "is sparsified already: sparsify the dense model"),
        ("splits", "moe", "is a moefied model already: compare split methods on the dense"),
    ],
)
def test_commands_that_need_a_dense_model_refuse_before_evaluating(
    command, folder, pattern, folders, capsys, tmp_path, no_evaluation
):
    argv = [command, "--model", str(folders[folder]), "--data", str(folders["text"]), *COMMON]
    argv += ["--tokens", "1024"]
    argv += ["--out", str(tmp_path / "out")] if command == "sparsify" else ["--methods", "random"]
    line = _error_line(argv, capsys)
    assert f"moefy {command}: error: {folders[folder]} {pattern}" in line, line
    assert "--model" in line
    assert not (tmp_path / "out").exists()


def test_convert_of_a_moefied_folder_speaks_cli_words(folders, capsys, tmp_path):
    line = _error_line(
        ["convert", "--model", str(folders["moe"]), "--out", str(tmp_path / "out")], capsys
    )
    assert "is a moefied model already: convert the dense model" in line
    assert not (tmp_path / "out").exists()


def test_convert_coactivation_without_profile_fails_before_loading(
    folders, capsys, tmp_path, monkeypatch
):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("moefy.models.load.load_model", refuse)
    argv = ["convert", "--model", str(folders["dense"]), "--method", "coactivation"]
    line = _error_line([*argv, "--out", str(tmp_path / "out")], capsys)
    assert "--method coactivation needs --profile" in line


def test_short_calibration_text_names_the_cli_option(folders, capsys, tmp_path, no_evaluation):
    argv = ["sparsify", "--model", str(folders["dense"]), "--data", str(folders["text"])]
    line = _error_line([*argv, "--tokens", "64", *COMMON, "--out", str(tmp_path / "o")], capsys)
    assert "fewer than the 1024 teal needs: give more text (--tokens)" in line


def test_library_verbs_name_a_moefied_model_not_a_missing_attribute(folders):
    from moefy.arch import find_ffns
    from moefy.models.load import load_model

    model, _ = load_model(str(folders["moe"]))
    with pytest.raises(MoefyError, match=r"model\.layers\.0\.mlp is a mixture-of-experts FFN"):
        find_ffns(model)
