"""Whether two sweep folders hold the same results: a refactor's check that behaviour is unchanged.

Compares ``rows.json`` of two ``moefy sweep`` folders row by row (method, level, every measured
figure), leaving out wall-clock fields (names with ``second`` or ``time``); prints each difference
and exits 1 when there is any other than the fields named with ``--ignore``.

Run (the same sweep from two checkouts, e.g. before and after a change):
    PYTHONPATH=/path/to/old/src .venv/bin/python -m moefy.cli.main sweep ... --out /tmp/old
    .venv/bin/moefy sweep ... --out /tmp/new
    .venv/bin/python benchmarks/same_rows.py /tmp/old /tmp/new [--ignore level_meaning]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _rows(folder: Path) -> list[dict]:
    data = json.loads((folder / "rows.json").read_text())
    return data if isinstance(data, list) else data["rows"]


def _timing(field: str) -> bool:
    return "second" in field or "time" in field


def differences(old: list[dict], new: list[dict], ignore: set[str]) -> list[str]:
    """One line per field that differs between rows of the same position (timings left out)."""
    if len(old) != len(new):
        return [f"{len(old)} rows against {len(new)}"]
    found = []
    for before, after in zip(old, new, strict=True):
        for field in sorted(set(before) | set(after)):
            if _timing(field) or field in ignore or before.get(field) == after.get(field):
                continue
            name = f"{before.get('method')} {before.get('level')}"
            found.append(f"{name}: {field} {before.get(field)!r} -> {after.get(field)!r}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="sweep folder from before")
    parser.add_argument("new", type=Path, help="sweep folder from after")
    parser.add_argument("--ignore", action="append", default=[], help="a field to leave out")
    args = parser.parse_args()
    old, new = _rows(args.old), _rows(args.new)
    found = differences(old, new, set(args.ignore))
    for line in found:
        print(line)
    print(f"{len(old)} rows compared, {len(found)} differences")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
