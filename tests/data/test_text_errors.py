"""Bad ``--data``: each is a one-line MoefyError that names the file (and line), never a
traceback, and an empty spec never reads the current folder."""

from __future__ import annotations

import json

import pytest

from moefy.cli.main import main
from moefy.data.text import load_text
from moefy.errors import MoefyError

DEEP = 100_000  # far past Python's recursion limit


def _one_line_error(spec, pattern):
    with pytest.raises(MoefyError, match=pattern) as err:
        load_text(spec)
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


@pytest.mark.parametrize("spec", ["", "   ", "\t\n"])
def test_a_blank_data_spec_never_reads_the_current_folder(spec, tmp_path, monkeypatch):
    (tmp_path / "private.txt").write_text("some words the old code read from the current folder")
    monkeypatch.chdir(tmp_path)
    _one_line_error(spec, r"no text given")


# (file name, bytes, pattern of the message)
BAD_FILES = [
    ("deep.jsonl", b'{"text": "fine"}\n' + b"[" * DEEP + b"]" * DEEP + b"\n", "line 2 is nested"),
    ("deep-object.jsonl", b'{"a":' * DEEP + b"1" + b"}" * DEEP, "line 1 is nested too deeply"),
    ("list.jsonl", b'["text"]\n', r'line 1 has no string "text" field \(found: a list\)'),
    ("number.jsonl", b"3\n", r"line 1 has no string \"text\" field \(found: a number\)"),
    ("null-text.jsonl", b'{"text": null}\n', r"found: text; \"text\" is null"),
    ("no-text.jsonl", b'{"body": "x"}\n\n{"b": 1}\n', r"line 1 has no string \"text\""),
    ("bad.jsonl", b'{"text": "a"}\n{"text": \n', r"line 2 is not valid JSON"),
    ("surrogate.jsonl", b'{"text": "ok"}\n{"text": "a \\ud800 b"}\n', r"line 2: .*\\ud800"),
    ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), r"is not UTF-8 text"),
    ("utf16.txt", "some text".encode("utf-16"), r"holds NUL bytes"),
    ("binary.txt", bytes(range(256)) * 4, r"holds NUL bytes"),
    ("zeros.jsonl", b"\0" * 64, r"holds NUL bytes"),
    ("weights.bin", b"\x80\x02}q\x00.", r"is not a \.txt or \.jsonl file"),
    ("blank.txt", b"  \n\n\t", r"is empty"),
]


@pytest.mark.parametrize(("name", "content", "pattern"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_are_one_line_errors_naming_the_file(name, content, pattern, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    message = _one_line_error(str(path), pattern)
    assert name in message


def test_a_key_with_a_newline_stays_on_one_line(tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text(json.dumps({"evil\nkey": 1, "b": 2}) + "\n")
    message = _one_line_error(str(path), r"line 1 has no string \"text\" field")
    assert "'evil\\nkey'" in message


def test_a_bad_file_inside_a_folder_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("good text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_bytes(b"[" * DEEP)
    message = _one_line_error(str(tmp_path), r"line 1 is nested too deeply")
    assert "b.jsonl" in message


def test_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a text file moefy reads")
    _one_line_error(str(tmp_path / "empty"), r"no \.txt or \.jsonl files under")


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    # JSON strings may hold U+2028, U+2029, \x1c-\x1e and \x85 as they are; str.splitlines cut
    # there and called the line invalid JSON.
    texts = ["one\u2028two", "three\u2029four\x1cfive\x85six", "seven\r"]
    path = tmp_path / "separators.jsonl"
    path.write_text(
        "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\n",
        encoding="utf-8",
        newline="",
    )
    assert load_text(str(path)).documents == texts


def test_cli_refuses_empty_data_before_loading_a_model(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --data was checked")

    monkeypatch.setattr("moefy.models.load.load_model", refuse)
    monkeypatch.chdir(tmp_path)
    for command in ("profile", "sparsify"):
        out = tmp_path / command
        assert main([command, "--data", "", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"moefy {command}: error: no text given" in err[0], err
        assert not out.exists()
