"""The output policy of moefy.io: what may be replaced, atomic writes, stale temporaries, locks,
SIGTERM, and the refusals an unprivileged user meets (run through setpriv)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moefy.errors import MoefyError
from moefy.io import (
    FILE,
    FOLDER,
    OUTPUT_MARKER,
    OutputLock,
    atomic_path,
    check_output,
    claim_output,
    is_moefy_folder,
    remove_stale_temporaries,
    temporary_sibling,
    working_folder,
    write_json,
)


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` with its kind and content, to compare before and after."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        elif path.is_file():
            out[rel] = "file:" + path.read_bytes().hex()
        else:  # a fifo: reading it would block
            out[rel] = f"special:{path.stat().st_mode:o}"
    return out


def _moefy_folder(path: Path) -> Path:
    with atomic_path(path, FOLDER) as tmp:
        tmp.mkdir()
        (tmp / "data.txt").write_text("first")
    return path


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.tex").write_text("years of work")
    (tmp_path / "file.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "user")
    (tmp_path / "devlink").symlink_to("/dev/null")
    _moefy_folder(tmp_path / "ours")
    return tmp_path


REFUSED = [
    # (path relative to scratch, or absolute; kind; overwrite; phrase in the message)
    ("", FOLDER, False, "is empty"),
    ("user/..", FOLDER, True, "names no folder"),
    ("user/.", FILE, True, "names no file"),
    ("/", FOLDER, True, "names no folder"),
    ("/proc/self/moefy-out", FILE, True, "under /proc"),
    ("/dev/full", FILE, True, "under /dev"),
    ("/dev/shm/moefy-out", FOLDER, True, "under /dev"),
    ("/sys/moefy", FOLDER, True, "under /sys"),
    ("devlink", FILE, True, "under /dev"),
    ("link", FOLDER, True, "symbolic link"),
    ("fifo", FILE, True, "special file"),
    ("user", FOLDER, True, "moefy did not write"),
    ("user", FOLDER, False, "moefy did not write"),
    ("user", FILE, True, "is a folder"),
    ("ours", FILE, True, "is a folder"),
    ("file.json", FOLDER, True, "is a file"),
    ("file.json", FILE, False, "pass --overwrite"),
    ("ours", FOLDER, False, "pass --overwrite"),
    ("file.json/inside", FOLDER, True, "is not a folder"),
    ("x" * 256, FILE, True, "over 255 bytes"),
]


@pytest.mark.parametrize(("name", "kind", "overwrite", "phrase"), REFUSED)
def test_refused_outputs_change_nothing(scratch, name, kind, overwrite, phrase):
    before = _tree(scratch)
    path = name if name.startswith("/") or not name else f"{scratch}/{name}"  # keeps "."
    with pytest.raises(MoefyError, match=phrase) as err:
        check_output(path, kind, overwrite=overwrite)
    assert "\n" not in str(err.value)
    # the writers refuse it the same way
    with pytest.raises(MoefyError), atomic_path(path, kind, overwrite=overwrite) as tmp:
        tmp.write_text("x") if kind == FILE else tmp.mkdir()
    assert _tree(scratch) == before


@pytest.mark.parametrize(
    ("name", "kind", "overwrite"),
    [
        ("new/deeper/out", FOLDER, False),
        ("empty", FOLDER, False),
        ("ours", FOLDER, True),
        ("file.json", FILE, True),
        ("new.json", FILE, False),
        ("y" * 255, FILE, False),  # the longest valid name: temporaries stay short
    ],
)
def test_allowed_outputs_are_written_whole(scratch, name, kind, overwrite):
    path = scratch / name
    with atomic_path(path, kind, overwrite=overwrite) as tmp:
        if kind == FILE:
            tmp.write_text("new")
        else:
            tmp.mkdir()
            (tmp / "data.txt").write_text("new")
    if kind == FILE:
        assert path.read_text() == "new"
    else:
        assert sorted(p.name for p in path.iterdir()) == ["data.txt", OUTPUT_MARKER]
        assert is_moefy_folder(path)
    assert (scratch / "user" / "thesis.tex").read_text() == "years of work"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".moefy-")]


def test_a_failed_write_leaves_the_old_output_and_no_temporary(scratch):
    before = _tree(scratch)
    boom = pytest.raises(RuntimeError, match="boom")
    with boom, atomic_path(scratch / "ours", FOLDER, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "data.txt").write_text("half")
        raise RuntimeError("boom")
    boom = pytest.raises(RuntimeError, match="boom")
    with boom, atomic_path(scratch / "new" / "deeper" / "out.json", FILE) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert _tree(scratch) == before  # the parents it created are gone too


def test_an_output_that_appears_while_writing_is_not_replaced(scratch):
    path = scratch / "race.json"
    with pytest.raises(MoefyError, match="pass --overwrite"), atomic_path(path, FILE) as tmp:
        tmp.write_text("mine")
        path.write_text("theirs")  # another writer finished first
    assert path.read_text() == "theirs"


def test_previous_release_folders_are_recognised(tmp_path):
    for files in (["moefy_config.json"], ["summary.json", "arrays.safetensors"]):
        folder = tmp_path / files[0]
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
        assert is_moefy_folder(folder)
        check_output(folder, FOLDER, overwrite=True)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "summary.json").write_text("{}")  # a user's file of the same name
    assert not is_moefy_folder(tmp_path / "half")
    project = tmp_path / "project"  # moefy's file names beside a user's own work
    (project / "checkpoint").mkdir(parents=True)
    (project / "train_log.csv").write_text("step\n")
    (project / "src").mkdir()
    (project / "src" / "precious.py").write_text("work")
    assert not is_moefy_folder(project)
    with pytest.raises(MoefyError, match="moefy did not write"):
        check_output(project, FOLDER, overwrite=True)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    path = tmp_path / "out"
    mine = temporary_sibling(path)  # this process is alive: kept
    dead = temporary_sibling(path)
    stale = dead.with_name(dead.name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-"))
    dead.rename(stale)
    legacy = tmp_path / ".out.a1b2c3d4.tmp"  # the previous release's name
    legacy.mkdir()
    other = temporary_sibling(tmp_path / "another-output")
    other_stale = other.with_name(other.name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-"))
    other.rename(other_stale)
    removed = remove_stale_temporaries(path)
    assert sorted(removed) == sorted([stale, legacy])
    assert mine.exists() and other_stale.exists()


def test_sigkill_mid_save_is_cleaned_by_the_next_write(tmp_path):
    path = tmp_path / "model"
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from moefy.io import atomic_path
        with atomic_path({str(path)!r}, "folder") as tmp:
            tmp.mkdir()
            (tmp / "weights").write_bytes(b"0" * 1000)
            os.kill(os.getppid(), signal.SIGUSR1)
            time.sleep(60)
        """
    )
    ready = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: ready.append(1))
    try:
        child = subprocess.Popen([sys.executable, "-c", script])
        for _ in range(600):
            if ready:
                break
            try:
                child.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
            break
        assert ready, "the child never reached its save"
        child.kill()
        child.wait()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".moefy-")]
    assert len(left) == 1 and not path.exists()
    with atomic_path(path, FOLDER) as tmp:
        tmp.mkdir()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_sigterm_unwinds_and_exits_143(tmp_path, monkeypatch, capsys):
    from moefy.cli import evaluate_cmd
    from moefy.cli.main import main

    out = tmp_path / "eval.json"

    def run(args):
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt the command")

    monkeypatch.setattr(evaluate_cmd, "_run", run)
    assert main(["evaluate", "--out", str(out)]) == 143
    assert "terminated" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the command


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    path = tmp_path / "out"
    with claim_output(path, FOLDER):
        with pytest.raises(MoefyError, match="another moefy run"), claim_output(path, FOLDER):
            pass
        holder = subprocess.run(  # another process: the same one-line refusal
            [
                sys.executable,
                "-c",
                f"from moefy.io import OutputLock; OutputLock({str(path)!r}).acquire()",
            ],
            capture_output=True,
            text=True,
        )
        assert holder.returncode != 0 and f"pid {os.getpid()}" in holder.stderr
    with claim_output(path, FOLDER):  # released: free again
        pass
    assert not OutputLock(path).lock_file.exists()
    assert not path.exists()  # claiming writes nothing


def test_working_folder_restores_the_old_one_or_keeps_new_progress(scratch):
    ours = scratch / "ours"
    with pytest.raises(RuntimeError), working_folder(ours, overwrite=True) as folder:
        assert [p.name for p in folder.iterdir()] == [OUTPUT_MARKER]
        raise RuntimeError("boom")
    assert (ours / "data.txt").read_text() == "first"
    with pytest.raises(KeyboardInterrupt), working_folder(ours, overwrite=True) as folder:
        (folder / "cache.json").write_text("progress")  # the fresh run got somewhere
        raise KeyboardInterrupt
    assert sorted(p.name for p in ours.iterdir()) == ["cache.json", OUTPUT_MARKER]
    assert [p.name for p in scratch.iterdir() if p.name.startswith(".moefy")] == []
    (ours / "data.txt").write_text("first")
    with working_folder(ours) as folder:  # resumed: kept
        assert (folder / "data.txt").exists()
    with pytest.raises(RuntimeError), working_folder(scratch / "a" / "b"):
        raise RuntimeError("boom")
    assert not (scratch / "a").exists()  # a new folder that holds nothing is removed
    with pytest.raises(RuntimeError), working_folder(scratch / "empty"):
        raise RuntimeError("boom")
    assert (scratch / "empty").is_dir()  # the user's empty folder stays


def test_write_json_never_replaces_a_folder(scratch):
    with pytest.raises(MoefyError, match="is a folder"):
        write_json(scratch / "ours", [1])
    write_json(scratch / "file.json", [1])
    assert json.loads((scratch / "file.json").read_text()) == [1]


def test_unprivileged_user_gets_one_line_errors():
    """Root may write anywhere, so permission refusals run as user nobody through setpriv."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to switch to an unprivileged user")
    import tempfile

    import moefy

    root = Path(tempfile.mkdtemp(prefix="moefy-io-perm-"))  # pytest's tmp_path is root-only
    try:
        root.chmod(0o755)
        (root / "locked").mkdir(mode=0o755)  # root's: nobody cannot write in it
        (root / "closed").mkdir(mode=0o700)  # nobody cannot even look into it
        (root / "ours").mkdir(mode=0o755)
        (root / "ours" / OUTPUT_MARKER).write_text("{}")  # moefy's, but read-only for nobody
        cases = [
            (str(root / "locked" / "out"), "folder", False, False, "is not writable"),
            (str(root / "locked" / "new" / "out"), "file", False, False, "is not writable"),
            (str(root / "closed" / "out"), "folder", False, False, "closed is not writable"),
            (str(root / "closed" / "sub" / "out"), "file", True, False, "Permission denied"),
            (str(root / "ours"), "folder", False, True, "cannot be resumed"),
            (str(root / "ours"), "folder", True, False, "is not writable"),
        ]
        script = textwrap.dedent(
            """
            import json, sys
            from moefy.errors import MoefyError
            from moefy.io import check_output
            for path, kind, overwrite, resume, _ in json.loads(sys.argv[1]):
                try:
                    check_output(path, kind, overwrite=overwrite, resume=resume)
                    print("allowed:", path)
                except MoefyError as err:
                    print("refused:", err)
            """
        )
        env = {**os.environ, "PYTHONPATH": str(Path(moefy.__file__).parents[1])}
        command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
        result = subprocess.run(
            [*command, "-c", script, json.dumps(cases)],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
        )
        lines = result.stdout.strip().splitlines()
        assert len(lines) == len(cases), result
        for line, (*_, phrase) in zip(lines, cases, strict=True):
            assert line.startswith("refused:") and phrase in line, line
        assert sorted(p.name for p in root.rglob("*")) == sorted(
            ["locked", "closed", "ours", OUTPUT_MARKER]
        )
    finally:
        shutil.rmtree(root)


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path):
    """A real full file system (a 64 KiB tmpfs) under safetensors' Rust writer and Python's."""
    import torch
    from safetensors.torch import save_file

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        with (
            pytest.raises(MoefyError, match="No space left on device"),
            atomic_path(mount / "model", FOLDER) as tmp,
        ):
            tmp.mkdir()
            save_file({"w": torch.zeros(64, 1024)}, str(tmp / "model.safetensors"))
        with (
            pytest.raises(MoefyError, match="No space left on device"),
            atomic_path(mount / "table.json") as tmp,
        ):
            tmp.write_bytes(b"0" * 100_000)
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)
