"""``moefy export``: writes, checks and prints the perplexities; refuses bad input with exit 2."""

from __future__ import annotations

import json

from export_support import bpe_tokenizer, carved

import moefy
from moefy.cli.main import main
from tiny_models import write_word_text


def _saved(tmp_path):
    folder = tmp_path / "carved"
    moefy.save(carved(), folder, tokenizer=bpe_tokenizer())
    text = tmp_path / "words.jsonl"
    write_word_text(text)
    return folder, text


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as done:  # argparse's usage errors
        return int(done.code)


def test_export_writes_checks_and_prints_both_perplexities(tmp_path, capsys) -> None:
    folder, text = _saved(tmp_path)
    common = ["--model", str(folder), "--data", str(text), "--block-len", "16"]
    sizes = ["--tokens", "256", "--eval-tokens", "64", "--keep", "0.5"]
    assert main(["export", *common, *sizes, "--out", str(tmp_path / "hf")]) == 0
    shown = capsys.readouterr().out
    assert "moefy (routed)" in shown and "export (hf, transformers)" in shown
    assert "held-out recall" in shown
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_experts_per_tok"] == 2
    gguf = ["--format", "gguf", "--dtype", "q8_0", "--out", str(tmp_path / "m.gguf")]
    assert main(["export", *common, *sizes, *gguf]) == 0
    assert "GGUF vs exported logits" in capsys.readouterr().out
    assert (tmp_path / "m.gguf").is_file()


def test_bad_input_exits_2_with_one_line(tmp_path, capsys) -> None:
    folder, text = _saved(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("not moefy's")
    base = ["export", "--model", str(folder), "--data", str(text), "--eval-tokens", "0"]
    for extra in (
        ["--out", str(tmp_path / "taken")],
        ["--format", "onnx", "--out", str(tmp_path / "o")],
        ["--dtype", "q8_0", "--out", str(tmp_path / "o")],
        [],
    ):
        assert _exit_code([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
