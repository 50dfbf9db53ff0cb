"""The results file: one JSON list of rows that every demo and sweep step adds to.

A row is a flat dict with at least ``family`` (``dense``, ``moe-oracle``, ...), ``method`` and
``level``; adding a row with the same three keys replaces the old one, so reruns do not pile up.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moefy.errors import MoefyError
from moefy.io import FILE, OutputLock, check_output, write_json
from moefy.jsonconfig import read_json

ROW_KEY = ("family", "method", "level")


def _key(row: Mapping[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ROW_KEY)


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows in ``path`` ([] when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise MoefyError(f"{path} is not a moefy results file (not a regular file)")
    rows = read_json(path, f"{path} is not a moefy results file", "; move it away")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise MoefyError(f"{path} is not a moefy results file (expected a JSON list of rows)")
    return rows


def check_results_file(path: str | os.PathLike, option: str = "--results") -> None:
    """Refuse, before any work, a results path that cannot take rows: a folder, a device, a
    file that is not a moefy results list (the rows would be lost at the end)."""
    check_output(path, FILE, overwrite=True, option=option)
    read_rows(path)


def add_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Merge ``rows`` into the results file at ``path`` atomically; return all rows."""
    check_output(path, FILE, overwrite=True, option="results file")  # never a folder or device
    with OutputLock(path, option="results file"):  # two runs adding rows: neither is lost
        merged = {_key(row): dict(row) for row in read_rows(path)}
        for row in rows:
            missing = [k for k in ROW_KEY if k not in row]
            if missing:
                raise MoefyError(f"results row {dict(row)} lacks {missing}")
            merged[_key(row)] = dict(row)
        all_rows = list(merged.values())
        write_json(path, all_rows)
    return all_rows
