"""The CLI end to end on a tiny local model: profile -> convert -> splits, and their outputs."""

from __future__ import annotations

import json

import pytest
import torch

from moefy.cli.main import main
from moefy.models.load import load_model
from moefy.moe import moe_layers
from moefy.profiling import SparsityProfile
from tiny_models import save_tiny_hf_folder, write_word_text


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, save_tiny_hf_folder(root / "tiny"), write_word_text(root / "text.jsonl")


def test_profile_convert_splits(workspace, capsys):
    root, model_dir, text = workspace
    common = ["--model", str(model_dir), "--data", str(text), "--block-len", "16"]
    assert (
        main(
            [
                "profile",
                *common,
                "--tokens",
                "256",
                "--coactivation",
                "--out",
                str(root / "profile"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "FFN activation sparsity" in out and "profile written to" in out
    prof = SparsityProfile.load(root / "profile")
    assert prof.num_layers == 2 and prof.n_tokens == 256
    assert sorted(p.name for p in (root / "profile" / "plots").iterdir())

    assert (
        main(
            [
                "convert",
                "--model",
                str(model_dir),
                "--experts",
                "8",
                "--method",
                "coactivation",
                "--profile",
                str(root / "profile"),
                "--out",
                str(root / "moe"),
            ]
        )
        == 0
    )
    model, tokenizer = load_model(root / "moe")
    layers = moe_layers(model)
    assert [m.num_experts for m in layers] == [8, 8]
    dense, _ = load_model(model_dir)
    ids = torch.randint(3, 30, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits)
    assert tokenizer is not None

    results = root / "results.json"
    assert (
        main(
            [
                "splits",
                *common,
                "--tokens",
                "64",
                "--experts",
                "8",
                "--methods",
                "random,coactivation",
                "--fractions",
                "0.5,0.25",
                "--profile",
                str(root / "profile"),
                "--results",
                str(results),
            ]
        )
        == 0
    )
    rows = json.loads(results.read_text())
    assert [(r["method"], r["level"]) for r in rows] == [
        ("dense", 1.0),
        ("random", 0.5),
        ("random", 0.25),
        ("coactivation", 0.5),
        ("coactivation", 0.25),
    ]
    for row in rows[1:]:
        assert row["active_fraction"] == pytest.approx(row["level"])
        assert row["ppl_ratio"] == pytest.approx(row["perplexity"] / rows[0]["perplexity"])
    # A rerun replaces rows with the same key instead of adding duplicates.
    assert (
        main(
            [
                "splits",
                *common,
                "--tokens",
                "64",
                "--experts",
                "8",
                "--methods",
                "random",
                "--fractions",
                "0.5",
                "--results",
                str(results),
            ]
        )
        == 0
    )
    assert len(json.loads(results.read_text())) == 5


def test_profile_from_another_model_is_refused(workspace, tmp_path, capsys):
    root, model_dir, text = workspace
    other = save_tiny_hf_folder(tmp_path / "gpt2", name="gpt2")
    if not (root / "profile").exists():
        pytest.skip("needs the profile from test_profile_convert_splits")
    code = main(
        [
            "convert",
            "--model",
            str(other),
            "--experts",
            "8",
            "--method",
            "coactivation",
            "--profile",
            str(root / "profile"),
            "--out",
            str(tmp_path / "moe"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "another model" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "moe").exists()


def test_coactivation_without_profile(workspace, tmp_path, capsys):
    _, model_dir, _ = workspace
    code = main(
        [
            "convert",
            "--model",
            str(model_dir),
            "--method",
            "coactivation",
            "--experts",
            "8",
            "--out",
            str(tmp_path / "moe"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "profile" in err
    assert not (tmp_path / "moe").exists()


def test_experts_out_of_range(workspace, tmp_path, capsys):
    _, model_dir, _ = workspace
    code = main(
        ["convert", "--model", str(model_dir), "--experts", "1000", "--out", str(tmp_path / "moe")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert not (tmp_path / "moe").exists()
