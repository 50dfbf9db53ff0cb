"""``moefy report``: rebuild report.html from a sweep folder's rows (no evaluation)."""

from __future__ import annotations

import argparse

from moefy.cli.args import add_output

HELP = "rebuild a sweep's report.html from its rows.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="a sweep folder (made by moefy sweep)")
    parser.add_argument("--profile", default=None, help="profile folder whose plots to include")
    add_output(
        parser, "report path (default SWEEP/report.html, which is always rewritten)", default=None
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path
    from types import SimpleNamespace

    from moefy.cli.show import console, esc
    from moefy.errors import MoefyError
    from moefy.io import FILE, claim_output
    from moefy.sweep.report import write_report
    from moefy.sweep.runner import REPORT_FILE, read_rows

    folder = Path(args.sweep)
    # the sweep's own report is always rewritten; another path follows the output policy
    out, overwrite = (
        (args.out, args.overwrite) if args.out is not None else (folder / REPORT_FILE, True)
    )
    with claim_output(out, FILE, overwrite=overwrite):  # checked first, locked while it runs
        rows = read_rows(folder)  # a one-line error for a missing or malformed rows.json
        if args.profile is not None and not Path(args.profile).is_dir():
            raise MoefyError(
                f"--profile {args.profile} is not a folder: give a moefy profile --out"
            )
        config = SimpleNamespace(profile=args.profile, model=folder.name, to_dict=lambda: {})
        path = write_report(rows, out, config=config, overwrite=overwrite)
    console().print(f"report: [bold]{esc(path)}[/bold]")
    return 0
