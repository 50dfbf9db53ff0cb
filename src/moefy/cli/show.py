"""Terminal output for the CLI: one rich console, tables from lists of row dicts."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

_PIPE_WIDTH = 160


@functools.cache
def console():
    """The shared rich console (stdout)."""
    import sys

    from rich.console import Console

    # Off a terminal (CI logs, pipes) rich assumes 80 columns and cuts numbers; give tables room.
    return Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH)


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
        console().print(f"{title}: (no rows)")
        return
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(str(key), justify="right")
    for row in rows:
        table.add_row(*(_cell(v) for v in row.values()))
    console().print(table)
