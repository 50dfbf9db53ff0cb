"""Progress output: rich's spinner on a terminal, timestamped stderr lines on request."""

from __future__ import annotations

import re

from rich.status import Status

from moefy.cli.show import PROGRESS_ENV, status


def test_progress_lines_go_to_stderr_with_elapsed_time(monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    with status("loading model") as progress:
        progress.update("compiling dense")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"\[\s*\d+\.\d s\] loading model", lines[0])
    assert lines[1].endswith("] compiling dense")


def test_default_progress_is_the_rich_spinner(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert isinstance(status("working"), Status)
