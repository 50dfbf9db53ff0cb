"""``moefy report``: rebuild report.html from a sweep folder's rows (no evaluation)."""

from __future__ import annotations

import argparse

HELP = "rebuild a sweep's report.html from its rows.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="a sweep folder (made by moefy sweep)")
    parser.add_argument("--profile", default=None, help="profile folder whose plots to include")
    parser.add_argument("--out", default=None, help="report path (default SWEEP/report.html)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from moefy.cli.show import console
    from moefy.errors import MoefyError
    from moefy.sweep.report import write_report
    from moefy.sweep.runner import REPORT_FILE, ROWS_FILE

    folder = Path(args.sweep)
    rows_file = folder / ROWS_FILE
    if not rows_file.is_file():
        raise MoefyError(f"{rows_file} not found: run moefy sweep --out {folder} first")
    try:
        rows = json.loads(rows_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoefyError(f"{rows_file} is not a sweep's rows file ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "method" in r for r in rows):
        raise MoefyError(f"{rows_file} is not a sweep's rows file (expected a list of rows)")
    config = SimpleNamespace(profile=args.profile, model=folder.name, to_dict=lambda: {})
    path = write_report(rows, args.out or folder / REPORT_FILE, config=config)
    console().print(f"report: [bold]{path}[/bold]")
    return 0
