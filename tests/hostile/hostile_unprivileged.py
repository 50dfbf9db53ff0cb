"""Run moefy commands in-process and print their exit codes and stderr as JSON.

``test_hostile_permissions.py`` starts this script once as an unprivileged user (``setpriv``,
when the suite runs as root, where permission bits do not apply) with every permission case on
stdin: ``[[case_id, working_folder, argv], ...]``. It prints ``{case_id: {"code": ..., "stderr":
...}}``; an exception escaping ``main`` is reported as the traceback a user would see.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback


def run_cases(cases: list[list]) -> dict[str, dict]:
    from moefy.cli.main import main

    results = {}
    for case_id, folder, argv in cases:
        os.chdir(folder)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
            except Exception:  # noqa: BLE001 - reported as the user would see it
                code = 1
                err.write(traceback.format_exc())
        results[case_id] = {"code": code, "stderr": err.getvalue()}
    return results


if __name__ == "__main__":
    json.dump(run_cases(json.load(sys.stdin)), sys.stdout)
