"""``moefy layers`` and ``moefy drop`` on a tiny Llama folder."""

from __future__ import annotations

import json

import pytest

import moefy
from moefy.cli.main import main
from moefy.layers import LayerImportance, dropped_layers
from moefy.layers.plots import PERPLEXITY_PLOT, SIMILARITY_PLOT
from tiny_models import WORDS, save_tiny_hf_folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers_cli")
    model_dir = save_tiny_hf_folder(root / "tiny")
    text = root / "text.txt"
    text.write_text(("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(20)) + "\n") * 20)
    common = ["--model", str(model_dir), "--data", str(text), "--block-len", "16"]
    return root, common


def _one_line_error(capsys, code):
    """The error line (progress bars of work done before the mistake showed may precede it)."""
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("moefy drop: error: "), err
    return last


def test_layers_command_writes_table_json_and_plots(workspace, capsys):
    root, common = workspace
    out = root / "layers"
    argv = ["layers", *common, "--tokens", "64", "--eval-tokens", "32", "--perplexity"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "attn sim" in printed and "most redundant attention" in printed
    importance = LayerImportance.load(out / "importance.json")
    assert importance.num_blocks == 2 and importance.has_perplexity
    assert (out / SIMILARITY_PLOT).is_file() and (out / PERPLEXITY_PLOT).is_file()


def test_drop_command_saves_a_loadable_model(workspace, capsys):
    root, common = workspace
    out = root / "drop"
    argv = ["drop", *common, "--tokens", "64", "--eval-tokens", "32", "--attention", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    model, tokenizer = moefy.load_model(out)
    dropped = dropped_layers(model)
    assert len(dropped.attention) == 1 and not dropped.mlp and not dropped.blocks
    report = json.loads((out / "drop_report.json").read_text())
    assert report["dropped"]["attention"] == list(dropped.attention)
    assert report["perplexity_dropped"] > 0 and tokenizer is not None


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ([], "nothing to drop"),
        (["--attention", "5"], "--attention 5: the model has only 2 blocks"),
        (["--blocks", "2"], "drop all 2 blocks"),
        (["--skip", "1"], "first and last block"),
    ],
)
def test_drop_mistakes_are_one_line_errors(workspace, capsys, extra, pattern):
    root, common = workspace
    out = root / "never"
    code = main(
        ["drop", *common, "--tokens", "32", "--eval-tokens", "32", *extra, "--out", str(out)]
    )
    assert pattern in _one_line_error(capsys, code)
    assert not out.exists()


def test_skip_and_speedup_are_exclusive(workspace, capsys):
    _, common = workspace
    with pytest.raises(SystemExit) as exc:
        main(["drop", *common, "--skip", "1", "--speedup", "1.5"])
    assert exc.value.code == 2
