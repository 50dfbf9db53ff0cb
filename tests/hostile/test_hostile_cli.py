"""Hostile inputs to the ``moefy`` command line.

Every row of :data:`hostile_cases.CLI_CASES` runs through :func:`test_refused`: exit code 2,
stderr exactly one line holding ``error:`` and no traceback, and no file, folder, link, fifo or
device anywhere in the scratch folder, the session's assets or the system paths it names changed
(the intended output must not exist after a refused run). The controls at the end show that the
rows' base arguments work, so a row is refused for its hostile part and nothing else.
"""

from __future__ import annotations

import contextlib
import string
from pathlib import Path

import pytest
from hostile_cases import BASE, CLI_CASES, PROOF, CliCase
from hostile_support import (
    Assets,
    CaseTimedOut,
    DiskState,
    GuardTripped,
    HeavyWorkStarted,
    no_heavy_work,
    refusal_problems,
    system_guard,
    watchdog,
)

from moefy.cli.main import main

SYSTEM_PATHS = ("/dev/null", "/dev/full", "/dev/zero")


def resolve_argv(argv: tuple[str, ...], assets: Assets) -> list[str]:
    """``argv`` with each ``{asset}`` replaced by its path (building the asset if needed)."""
    names = {name for arg in argv for _, name, _, _ in string.Formatter().parse(arg) if name}
    paths = {name: str(assets[name]) for name in names}
    return [arg.format_map(paths) for arg in argv]


def system_paths(argv: list[str], roots: list[Path]) -> tuple[str, ...]:
    """The absolute paths in ``argv`` outside ``roots``, and the devices some cases target."""
    outside = [
        arg
        for arg in argv
        if arg.startswith("/") and not any(arg.startswith(str(root)) for root in roots)
    ]
    return tuple(dict.fromkeys([*SYSTEM_PATHS, *outside]))


def run_cli(argv: list[str], *, early: bool = False) -> tuple[int | None, str | None]:
    """``moefy ARGV`` in-process under the guards: ``(exit code, None)``, argparse's SystemExit
    included, or ``(None, what went wrong)`` when a Python exception escaped ``main`` (a user
    would see its traceback) or a guard stopped the run."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(watchdog())
        stack.enter_context(system_guard())
        if early:
            stack.enter_context(no_heavy_work())
        try:
            return main(argv), None
        except SystemExit as exit_:
            return (exit_.code if isinstance(exit_.code, int) else 1), None
        except (GuardTripped, HeavyWorkStarted, CaseTimedOut) as err:
            return None, f"{type(err).__name__}: {err}"
        except Exception as err:  # noqa: BLE001 - the user would see a traceback
            message = str(err).strip().splitlines()
            return None, f"traceback: {type(err).__name__}: {message[-1] if message else ''}"


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.id for case in CLI_CASES])
def test_refused(case: CliCase, scratch: Path, assets: Assets, capsys: pytest.CaptureFixture):
    for setup in case.setup:
        setup(scratch, assets)
    argv = resolve_argv(case.argv, assets)
    roots = [scratch, *assets.built()]
    disk = DiskState(roots, system_paths(argv, roots))
    before = disk.take()
    capsys.readouterr()  # what the set-up printed

    code, crash = run_cli(argv, early=case.early)
    err = capsys.readouterr().err

    problems = ["a crafted pickle ran its code"] if (scratch / PROOF).exists() else []
    problems += [crash] if crash else refusal_problems(code, err, case.expect)
    changes = DiskState.changes(before, disk.take())
    if changes:
        problems.append(f"disk changed ({len(changes)}): " + "; ".join(changes[:6]))
    assert not problems, " | ".join(problems)


def test_the_table_is_large_and_unique():
    ids = [case.id for case in CLI_CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(ids) >= 150


# ----------------------------------------------------------------------------- controls

# (command, output options and the new paths they get)
_OUTPUT_OPTIONS = {
    "profile": (("--out", "new"),),
    "convert": (("--out", "new"),),
    "splits": (("--results", "new.json"),),
    "train-routers": (("--out", "new"), ("--results", "new.json")),
    "sparsify": (("--out", "new"),),
    "bench": (("--out", "new.json"),),
    "evaluate": (("--out", "new.json"),),
    "sweep": (("--out", "new"),),
    "report": (("--out", "new.html"),),
    "layers": (("--out", "new"),),
    "drop": (("--out", "new"),),
    "finetune": (("--out", "new"),),
    "export": (("--out", "new"),),
    "generate": (),
}


def _fake_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench times real kernels for a minute; its control checks arguments and output only."""
    import moefy.bench
    import moefy.bench.report

    monkeypatch.setattr(moefy.bench, "run_bench", lambda config, progress=None: {"decode": []})
    monkeypatch.setattr(moefy.bench.report, "cpu_report", lambda results: [])


@pytest.mark.parametrize("command", sorted(BASE))
def test_base_arguments_work(command: str, scratch: Path, assets: Assets, monkeypatch, capsys):
    """Each command's base arguments, with new outputs, succeed and write exactly those."""
    if command == "bench":
        _fake_bench(monkeypatch)
    outputs = _OUTPUT_OPTIONS[command]
    argv = resolve_argv(BASE[command], assets)
    for option, path in outputs:
        argv += [option, path]
    code, crash = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 0, f"moefy {' '.join(argv)}: {crash or f'exit {code}'}: {err[-800:]}"
    written = sorted(path.name for path in scratch.iterdir())
    assert written == sorted({path.split("/")[0] for _, path in outputs}), written


@pytest.mark.parametrize(
    ("command", "name"), [("convert", "n" * 250), ("evaluate", "n" * 245 + ".json")]
)
def test_a_long_valid_name_works(command: str, name: str, scratch: Path, assets: Assets, capsys):
    """A 250-byte name is valid: moefy's temporary names must not push it past 255."""
    code, crash = run_cli([*resolve_argv(BASE[command], assets), "--out", name])
    err = capsys.readouterr().err
    assert code == 0, crash or err[-800:]
    assert (scratch / name).exists()
