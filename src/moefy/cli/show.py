"""Terminal output for the CLI: one rich console, progress status, tables from row dicts."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

_PIPE_WIDTH = 160
# MOEFY_PROGRESS=lines: progress as timestamped lines on stderr instead of a spinner (for logs
# of unattended runs, e.g. benchmarks/gpu_session.sh, where a spinner prints nothing).
PROGRESS_ENV = "MOEFY_PROGRESS"


def esc(value: object) -> str:
    """``value`` as text that rich prints as it is: a path or name holding ``[...]`` is not
    read as markup (which would restyle the line or raise on a stray closing tag)."""
    from rich.markup import escape

    return escape(str(value))


@functools.cache
def console():
    """The shared rich console (stdout)."""
    import sys

    from rich.console import Console

    # Off a terminal (CI logs, pipes) rich assumes 80 columns and cuts numbers; give tables room.
    return Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH)


class _LineStatus:
    """A stand-in for rich's status spinner that prints each message as a line on stderr."""

    def __init__(self, message: str) -> None:
        self._start = time.monotonic()
        self.update(message)

    def update(self, message: str) -> None:
        print(f"[{time.monotonic() - self._start:7.1f} s] {message}", file=sys.stderr, flush=True)

    def __enter__(self) -> _LineStatus:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def status(message: str) -> Any:
    """A context manager showing progress: rich's spinner, or lines with ``MOEFY_PROGRESS=lines``.

    Both have ``update(message)``.
    """
    if os.environ.get(PROGRESS_ENV) == "lines":
        return _LineStatus(message)
    return console().status(esc(message))


def _cell(value: object) -> str:
    if value is None:  # not measured for this row
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_table(title: str, rows: Sequence[Mapping[str, object]]) -> None:
    """Print ``rows`` (dicts with the same keys) as a table; keys become the column headers."""
    from rich.table import Table

    if not rows:
        console().print(f"{esc(title)}: (no rows)")
        return
    table = Table(title=esc(title))
    for key in rows[0]:
        table.add_column(esc(key), justify="right")
    for row in rows:
        table.add_row(*(esc(_cell(v)) for v in row.values()))
    console().print(table)


def print_report(items: Sequence[object]) -> None:
    """Print a library report: each text as a line, each table (an object with ``title`` and
    ``rows``, as :class:`moefy.bench.report.Table`) with :func:`print_table`."""
    for item in items:
        if isinstance(item, str):
            console().print(esc(item))
        else:
            print_table(item.title, item.rows)
