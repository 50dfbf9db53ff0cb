"""Hostile inputs only an unprivileged user meets: read-only folders, unreadable files.

Permission bits do not stop root, and the suite often runs as root (CI containers), so these rows
run as ``nobody`` (uid 65534) through ``setpriv``, all in ONE subprocess
(``hostile_unprivileged.py``) to pay Python's start-up once. Run by another user, the subprocess
runs as that user; run as root without ``setpriv``, the rows are skipped.

Each row must exit 2 with one error line and no traceback, and leave its folder as it was; the
control row shows that the same user can write a new output at all.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile_cases import BASE, Setup, copy_asset
from hostile_support import Assets, DiskState, refusal_problems

UNPRIVILEGED_UID = 65534  # nobody
DRIVER = Path(__file__).with_name("hostile_unprivileged.py")
SUBPROCESS_SECONDS = 300
Restrict = Callable[[Path], None]


@dataclass(frozen=True)
class PermissionCase:
    """A row: ``setup`` builds the case's folder (as root), everything in it is then made
    readable, and ``restrict`` takes permissions away; ``code`` 0 marks a control."""

    id: str
    argv: tuple[str, ...]
    setup: tuple[Setup, ...] = ()
    restrict: tuple[Restrict, ...] = ()
    expect: tuple[str, ...] = ()
    code: int = 2


def make_folder(name: str) -> Setup:
    def setup(scratch: Path, assets: Assets) -> None:
        (scratch / name).mkdir()

    return setup


def read_only(name: str) -> Restrict:
    """No write permission anywhere under ``name`` (folders 0555, files 0444)."""

    def restrict(folder: Path) -> None:
        top = folder / name
        for path in [*top.rglob("*"), top] if top.is_dir() else [top]:
            path.chmod(0o555 if path.is_dir() else 0o444)

    return restrict


def no_access(name: str) -> Restrict:
    def restrict(folder: Path) -> None:
        (folder / name).chmod(0)

    return restrict


MODEL_DATA = BASE["evaluate"][1:9]  # --model {tiny} --data {text} --block-len 32 --batch-size 4

PERMISSION_CASES = (
    PermissionCase(
        "perm-control-evaluate-new-output", (*BASE["evaluate"], "--out", "new.json"), code=0
    ),
    PermissionCase(
        "perm-evaluate-out-in-read-only-folder",
        (*BASE["evaluate"], "--out", "ro/report.json"),
        (make_folder("ro"),),
        (read_only("ro"),),
        expect=("ro/",),
    ),
    PermissionCase(
        "perm-profile-out-in-read-only-folder",
        (*BASE["profile"], "--out", "ro/profile"),
        (make_folder("ro"),),
        (read_only("ro"),),
        expect=("ro/",),
    ),
    PermissionCase(
        "perm-splits-results-in-read-only-folder",
        (*BASE["splits"], "--results", "ro/results.json"),
        (make_folder("ro"),),
        (read_only("ro"),),
        expect=("ro/",),
    ),
    PermissionCase(
        "perm-convert-overwrite-in-read-only-folder",
        (*BASE["convert"], "--out", "ro/earlier", "--overwrite"),
        (make_folder("ro"), copy_asset("moe", "ro/earlier")),
        (read_only("ro"),),
        expect=("ro/",),
    ),
    PermissionCase(
        "perm-evaluate-data-unreadable",
        ("evaluate", *MODEL_DATA[:2], "--data", "secret.jsonl", *MODEL_DATA[4:], "--tokens", "256"),
        (copy_asset("text", "secret.jsonl"),),
        (no_access("secret.jsonl"),),
        expect=("secret.jsonl",),
    ),
    PermissionCase(
        "perm-evaluate-weights-unreadable",
        ("evaluate", "--model", "m", *MODEL_DATA[2:], "--tokens", "256"),
        (copy_asset("tiny", "m"),),
        (no_access("m/model.safetensors"),),
        expect=("model.safetensors",),
    ),
    PermissionCase(
        "perm-profile-model-folder-closed",
        ("profile", "--model", "m", *MODEL_DATA[2:], "--tokens", "256", "--no-plots"),
        (copy_asset("tiny", "m"),),
        (no_access("m"),),
        expect=("m/", "m is", "'m'", "m:"),
    ),
    PermissionCase(
        "perm-report-rows-unreadable",
        ("report", "sw", "--out", "report.html"),
        (copy_asset("sweep", "sw"),),
        (no_access("sw/rows.json"),),
        expect=("rows.json",),
    ),
    PermissionCase(
        "perm-sweep-resume-read-only",
        (*BASE["sweep"], "--out", "sw"),
        (copy_asset("sweep", "sw"),),
        (read_only("sw"),),
        expect=("sw/", "sw:", "--out sw"),
    ),
    PermissionCase(
        "perm-finetune-resume-read-only",
        (*BASE["finetune"][:-4], "--steps", "2", "--eval-tokens", "0", "--out", "ft"),
        (copy_asset("ft", "ft"),),
        (read_only("ft"),),
        expect=("ft/", "ft:", "--out ft"),
    ),
)


def _readable(folder: Path) -> None:
    """a+rX on everything under ``folder`` (copies keep the asset's 0600 weights)."""
    for path in [folder, *folder.rglob("*")]:
        extra = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
        if path.is_dir():
            extra |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
        path.chmod(stat.S_IMODE(path.stat().st_mode) | extra)


def _unprivileged_command() -> list[str]:
    if os.geteuid() != 0:
        return [sys.executable, str(DRIVER)]
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permission bits cannot be tested")
    uid = f"{UNPRIVILEGED_UID}"
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        sys.executable,
        str(DRIVER),
    ]


@pytest.fixture(scope="module")
def unprivileged_runs(assets: Assets):
    """Every row run once as the unprivileged user: case id -> (code, stderr, disk changes)."""
    command = _unprivileged_command()
    root = Path(tempfile.mkdtemp(prefix="moefy-hostile-permissions-"))
    try:
        root.chmod(0o755)
        home = root / "home"  # caches of the libraries; not compared
        home.mkdir(mode=0o777)
        home.chmod(0o777)
        shared = root / "shared"
        shared.mkdir()
        names = {}
        for name in ("tiny", "text"):
            target = shared / assets[name].name
            copy_asset(name, target.name)(shared, assets)
            names[name] = str(target)
        _readable(shared)
        runs = []
        for case in PERMISSION_CASES:
            folder = root / case.id
            folder.mkdir()
            for setup in case.setup:
                setup(folder, assets)
            _readable(folder)
            folder.chmod(0o777)  # the user may write beside the hostile part
            for restrict in case.restrict:
                restrict(folder)
            runs.append([case.id, str(folder), [arg.format_map(names) for arg in case.argv]])
        disks = {case.id: DiskState([root / case.id]) for case in PERMISSION_CASES}
        before = {case_id: disk.take() for case_id, disk in disks.items()}
        env = {
            **os.environ,
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "MPLCONFIGDIR": str(home / "matplotlib"),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HF_HUB_OFFLINE": "1",
        }
        env.pop("MOEFY_PROGRESS", None)
        done = subprocess.run(
            command,
            input=json.dumps(runs),
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            timeout=SUBPROCESS_SECONDS,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"the unprivileged run failed ({done.returncode}): {done.stderr[-800:]}")
        results = json.loads(done.stdout)
        return {
            case_id: (
                result["code"],
                result["stderr"],
                DiskState.changes(before[case_id], disks[case_id].take()),
            )
            for case_id, result in results.items()
        }
    finally:
        for path in [root, *root.rglob("*")]:  # give back what the rows took away, then remove
            if not path.is_symlink():
                path.chmod(0o700)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("case", PERMISSION_CASES, ids=[case.id for case in PERMISSION_CASES])
def test_refused_without_permission(case: PermissionCase, unprivileged_runs):
    code, err, changes = unprivileged_runs[case.id]
    if case.code == 0:
        assert code == 0, f"exit {code}: {err.strip().splitlines()[-1:]}"
        return
    problems = refusal_problems(code, err, case.expect)
    if changes:
        problems.append(f"disk changed ({len(changes)}): " + "; ".join(changes[:6]))
    assert not problems, " | ".join(problems)
