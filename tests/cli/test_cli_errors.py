"""CLI user mistakes: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers as T

from moefy.cli.main import main
from tiny_models import save_tiny_hf_folder, tiny_tokenizer


def _run(argv, capsys):
    capsys.readouterr()  # drop what the test's own set-up printed
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err
    assert pattern in lines[0], lines[0]


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["profile", "--tokens", "-5"], "must be > 0"),
        (["profile", "--tokens", "many"], "whole number"),
        (["profile", "--active-share", "1.5"], "between 0 and 1"),
        (["profile", "--active-rule", "psychic"], "invalid choice"),
        (["nonsense-command"], "invalid choice"),
        (["profile", "--tokns", "5"], "moefy profile: error: unrecognized arguments: --tokns 5"),
        (["profile", "--coactivaton"], "did you mean --coactivation?"),
        (["drop", "--count", "3"], "(see 'moefy drop --help')"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, pattern, capsys):
    code, err = _exit_code(argv, capsys)
    _assert_one_line_error(code, err, pattern)


def test_missing_model_folder(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(["profile", "--model", str(tmp_path / "nope"), "--out", str(out)], capsys)
    _assert_one_line_error(code, err, "nope")
    assert not out.exists()


def test_hub_id_is_refused_without_download(tmp_path, capsys):
    code, err = _run(
        ["profile", "--model", "meta-llama/Llama-2-7b-hf", "--out", str(tmp_path)], capsys
    )
    _assert_one_line_error(code, err, "Llama-2-7b-hf")
    assert "download" in err


def test_folder_that_is_not_a_hf_model(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    out = tmp_path / "out"
    code, err = _run(["profile", "--model", str(tmp_path), "--out", str(out)], capsys)
    _assert_one_line_error(code, err, "config.json")
    assert not out.exists()


def test_unrecognized_argument_suggests_only_a_close_option(capsys):
    code, err = _exit_code(["drop", "--count", "3"], capsys)
    _assert_one_line_error(code, err, "--count 3")
    assert "did you mean" not in err


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ('{"model_type": "nonsense"}', "unknown architecture 'nonsense'"),
        ("{", "is not a valid model config"),
        ('{"hidden_size": 8}', "names no model_type"),
    ],
)
def test_config_that_transformers_cannot_read(tmp_path, config, pattern, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(config)
    out = tmp_path / "out"
    code, err = _run(["profile", "--model", str(tmp_path / "model"), "--out", str(out)], capsys)
    _assert_one_line_error(code, err, pattern)
    assert not out.exists()


def test_unsupported_architecture(tmp_path, capsys):
    torch.manual_seed(0)
    config = T.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=64)
    T.BloomForCausalLM(config).save_pretrained(tmp_path / "bloom")
    tiny_tokenizer().save_pretrained(tmp_path / "bloom")
    text = tmp_path / "text.txt"
    text.write_text("the market was up and the bank was down " * 200)
    out = tmp_path / "out"
    argv = [
        "profile",
        "--model",
        str(tmp_path / "bloom"),
        "--data",
        str(text),
        "--tokens",
        "64",
        "--block-len",
        "16",
        "--out",
        str(out),
    ]
    code, err = _run(argv, capsys)
    _assert_one_line_error(code, err, "unsupported architecture 'bloom'")
    assert "register_architecture" in err
    assert not out.exists()


@pytest.mark.parametrize("content", ["", "the market"])
def test_empty_or_too_short_text(tmp_path, content, capsys):
    model_dir = save_tiny_hf_folder(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text(content)
    out = tmp_path / "out"
    argv = [
        "profile",
        "--model",
        str(model_dir),
        "--data",
        str(text),
        "--tokens",
        "4096",
        "--out",
        str(out),
    ]
    code, err = _run(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_unknown_data_name(tmp_path, capsys):
    model_dir = save_tiny_hf_folder(tmp_path / "tiny")
    code, err = _run(
        [
            "profile",
            "--model",
            str(model_dir),
            "--data",
            "wikipedia-9000",
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    _assert_one_line_error(code, err, "wikipedia-9000")


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import sys; from moefy.cli.main import build_parser; build_parser(); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
