"""A ChangeFormat without its own ``read`` reads its record with read_marker."""

from __future__ import annotations

import json

import pytest

from moefy.errors import MoefyError
from moefy.jsonconfig import read_json
from moefy.saving.changes import ChangeFormat

MARKER = "moefy_mine.json"


def _format() -> ChangeFormat:
    return ChangeFormat(
        name="moefy-mine",
        file=MARKER,
        rank=50,
        capture=lambda model: None,
        replay=lambda model, record, header, folder: None,
        missing_hint="write one with save_mine",
        version=2,
        required=("mine",),
    )


def _write(folder, **record) -> None:
    (folder / MARKER).write_text(json.dumps(record))


GOOD = {"format": "moefy-mine", "format_version": 2, "model_class": "Toy", "mine": 1}
READ_CASES = [
    # (record written, or None for no file; the error's end, or None when it is read)
    (GOOD, None),
    (None, "has no moefy_mine.json: write one with save_mine"),
    ({**GOOD, "format_version": 3}, "this moefy reads up to 2: upgrade moefy"),
    ({k: v for k, v in GOOD.items() if k != "mine"}, "lacks 'mine': save the model again"),
    ({**GOOD, "format": "moefy-other"}, "is not a moefy-mine marker: save the model again"),
]


@pytest.mark.parametrize(("record", "error"), READ_CASES)
def test_the_default_read_checks_the_marker(tmp_path, record, error):
    if record is not None:
        _write(tmp_path, **record)
    if error is None:
        assert _format().read(tmp_path) == GOOD
    else:
        with pytest.raises(MoefyError, match=error.replace("(", r"\(")):
            _format().read(tmp_path)


def test_a_format_keeps_its_own_read(tmp_path):
    own = ChangeFormat(
        name="moefy-mine",
        file=MARKER,
        rank=50,
        capture=lambda model: None,
        replay=lambda model, record, header, folder: None,
        read=lambda folder: {"read": "by its own"},
    )
    assert own.read(tmp_path) == {"read": "by its own"}


def test_read_json_says_what_and_what_to_do(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": [1, 2]}')
    assert read_json(path, "unused") == {"a": [1, 2]}
    path.write_text("{not json")
    with pytest.raises(MoefyError, match=r"^x is bad \(Expecting .*\); fix it$"):
        read_json(path, "x is bad", "; fix it")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(MoefyError, match=r"^x is bad \('utf-8' codec"):
        read_json(path, "x is bad")
