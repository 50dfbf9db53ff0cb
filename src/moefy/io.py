"""Safe outputs: one policy for every file and folder moefy writes.

Every output is written to a short temporary sibling and renamed into place, so no half-written
file is ever left at the final path. What may stand at that path before:

- nothing, or an empty folder (for a folder output): written;
- a regular file (for a file output): replaced only with ``overwrite``;
- a folder moefy wrote (it holds :data:`OUTPUT_MARKER`, or the files of a folder the previous
  release wrote): replaced atomically only with ``overwrite``;
- anything else (a folder moefy did not write, a file where a folder goes, a folder where a file
  goes, a symlink, a device or fifo, a path under ``/proc``, ``/dev`` or ``/sys``): refused with a
  one-line :class:`~moefy.errors.MoefyError`, with or without ``overwrite``.

Temporary names are ``.moefy-<tag>-<pid>-<random>.tmp`` beside the output (``tag`` hashes the
output's name), short enough for any valid final name. A run killed with SIGKILL leaves one
behind; the next write to the same path removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from moefy.errors import MoefyError

OutputKind = Literal["file", "folder"]
FILE: OutputKind = "file"
FOLDER: OutputKind = "folder"

OUTPUT_MARKER = "moefy_output.json"
"""The file that says moefy wrote a folder (and may replace it with ``overwrite``)."""

# Folders the previous release wrote carry no OUTPUT_MARKER; any of these files marks them.
_LEGACY_MARKERS = (
    ("moefy_config.json",),  # moefied model (moefy convert, train-routers)
    ("moefy_sparsify.json",),  # sparsified model
    ("moefy_layers.json",),  # layer-dropped model
    ("summary.json", "arrays.safetensors"),  # profile
    ("rows.json", "cache"),  # sweep
    ("checkpoint", "train_log.csv"),  # finetune
    ("finetune_report.json",),
    ("importance.json",),  # moefy layers
)
# everything an older release wrote into its folders (model, tokenizer, profile, sweep, finetune,
# layers, reports); a folder with any other entry is not taken for one of moefy's
_LEGACY_NAMES = frozenset(
    {name for group in _LEGACY_MARKERS for name in group}
    | {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    | {"tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"}
    | {"tokenizer.model", "added_tokens.json", "chat_template.jinja", "vocab.txt"}
    | {"coactivation.safetensors", "plots", "report.html", "router_report.json"}
    | {"sparsify_report.json", "drop_report.json", "train_log.csv"}
)
_LEGACY_SUFFIXES = (".png",)
LOCK_DIR = Path(tempfile.gettempdir()) / "moefy-locks"
"""Where :class:`OutputLock` keeps its lock files (one per output being written)."""
_SYSTEM_ROOTS = (Path("/proc"), Path("/dev"), Path("/sys"))
_NAME_MAX = 255
_TEMP_PREFIX = ".moefy-"
# ``.moefy-<tag>-<host>-<pid>-<random>.tmp``: the host, so that a run on another machine sharing
# the folder (a cluster's file system) never takes a live temporary there for a dead one
_TEMP_RE = re.compile(r"^\.moefy-([0-9a-f]{8})-([0-9a-f]{4})-(\d+)-[a-z0-9_]+\.(tmp|old)$")
# the previous release's temporaries: ``.NAME.XXXXXXXX.tmp`` (tempfile.mkdtemp's 8 characters)
_LEGACY_TEMP_RE = r"^\.{name}\.[a-z0-9_]{{8}}\.tmp$"


def is_moefy_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder moefy wrote (its marker, or the files of an older release)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    if (path / OUTPUT_MARKER).is_file():
        return True
    names = {entry.name for entry in path.iterdir()}
    # an older release's folder: its files, and nothing a user might have put beside them
    return any(names.issuperset(group) for group in _LEGACY_MARKERS) and all(
        name in _LEGACY_NAMES or name.startswith(_TEMP_PREFIX) or name.endswith(_LEGACY_SUFFIXES)
        for name in names
    )


def write_output_marker(folder: str | os.PathLike) -> None:
    """Put :data:`OUTPUT_MARKER` into ``folder`` (moefy's claim on it), unless it is there."""
    from moefy import __version__

    marker = Path(folder) / OUTPUT_MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"writer": "moefy", "moefy_version": __version__}) + "\n")


def check_output(
    path: str | os.PathLike | None,
    kind: OutputKind,
    *,
    overwrite: bool = False,
    resume: bool = False,
    option: str = "--out",
) -> Path:
    """Check that ``path`` may receive a ``kind`` output; nothing is written.

    Args:
        path: the output path.
        kind: ``"file"`` or ``"folder"``.
        overwrite: an existing output moefy wrote (or an existing file) may be replaced.
        resume: an existing folder moefy wrote may be continued (sweep, finetune).
        option: the CLI option that named the path, for the messages.

    Returns:
        ``Path(path)``.

    Raises:
        MoefyError: the path is refused; the message says why and what to do.
    """
    if path is None or not str(path).strip():
        raise MoefyError(f"{option} is empty: give a path to write to")
    try:
        return _check_output(str(path), kind, overwrite, resume, option)
    except OSError as err:  # a folder on the way that this user may not look into
        raise MoefyError(f"{option} {path}: {err.strerror or err}; choose another path") from None


def _check_output(raw: str, kind: OutputKind, overwrite: bool, resume: bool, option: str) -> Path:
    path = Path(raw)
    last = raw.rstrip("/").rsplit("/", 1)[-1]
    if last in ("", ".", "..") or path == Path(path.anchor or "."):
        raise MoefyError(f"{option} {raw!r} names no {kind} of its own: give a new name")
    if len(os.fsencode(path.name)) > _NAME_MAX:
        raise MoefyError(
            f"{option}: the name {path.name[:40]}... is over {_NAME_MAX} bytes: give a shorter one"
        )
    resolved = Path(os.path.realpath(path))
    for root in _SYSTEM_ROOTS:
        if resolved == root or root in resolved.parents:
            raise MoefyError(f"{option} {raw} is under {root}: write to a normal folder")
    for parent in (path.parent, *path.parent.parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise MoefyError(f"{option} {raw}: {parent} is not a folder; choose another path")
            resumed_in_place = resume and not overwrite and path.is_dir()
            if not resumed_in_place and not os.access(parent, os.W_OK | os.X_OK):
                raise MoefyError(f"{option} {raw}: {parent} is not writable; choose another path")
            break
    if path.is_symlink():
        raise MoefyError(f"{option} {raw} is a symbolic link: give the real path or a new name")
    if not path.exists():
        return path
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise MoefyError(
            f"{option} {raw} is a device or special file: moefy never replaces one; choose "
            "another path"
        )
    if kind == FILE:
        if stat.S_ISDIR(mode):
            raise MoefyError(f"{option} {raw} is a folder, not a file: give a file name")
        if not overwrite:
            raise MoefyError(
                f"{option} {raw} exists: pass --overwrite (overwrite=True in Python) to replace "
                "it, or choose another path"
            )
        return path
    if stat.S_ISREG(mode):
        raise MoefyError(f"{option} {raw} is a file, not a folder: give a folder name")
    if not any(path.iterdir()):
        return path
    if not is_moefy_folder(path):
        raise MoefyError(
            f"{option} {raw} is a folder moefy did not write: moefy never replaces one; "
            "choose a new name"
        )
    if not (overwrite or resume):
        raise MoefyError(
            f"{option} {raw} holds an earlier moefy output: pass --overwrite (overwrite=True in "
            "Python) to replace it, or choose another path"
        )
    if resume and not os.access(path, os.W_OK | os.X_OK):
        raise MoefyError(f"{option} {raw} is not writable, so it cannot be resumed")
    return path


def _tag(path: Path) -> str:
    return hashlib.sha1(os.fsencode(path.name)).hexdigest()[:8]


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what killed runs left beside ``path``: temporaries whose process is gone, and the
    previous release's ``.NAME.XXXXXXXX.tmp`` folders. Returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    tag = _tag(path)
    legacy = re.compile(_LEGACY_TEMP_RE.format(name=re.escape(path.name)))
    removed = []
    for entry in path.parent.iterdir():
        match = _TEMP_RE.match(entry.name)
        stale = (
            match is not None
            and match.group(1) == tag
            and match.group(2) == _host_tag()
            and not _pid_alive(int(match.group(3)))
        ) or legacy.match(entry.name) is not None
        if stale:
            _remove(entry)
            removed.append(entry)
    return removed


def temporary_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A new, empty temporary folder beside ``path`` with a short name."""
    prefix = f"{_TEMP_PREFIX}{_tag(path)}-{_host_tag()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, kind: OutputKind = FILE, *, overwrite: bool = False
) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    ``path`` is checked first (:func:`check_output`); the caller creates a ``kind`` at the
    yielded path (a folder output also gets :data:`OUTPUT_MARKER`). It replaces ``path`` only
    when the block exits without an exception; otherwise it is deleted.

    Args:
        path: the final path.
        kind: ``"file"`` or ``"folder"``.
        overwrite: an existing output moefy wrote (or a regular file) may be replaced.

    Raises:
        MoefyError: the path is refused (see the module docstring), or it appeared while
            writing without ``overwrite``.

    Example:
        >>> with atomic_path("out/table.json") as tmp:
        ...     tmp.write_text("{}")
    """
    path = check_output(path, kind, overwrite=overwrite, option="output")
    new_parents = [p for p in path.parents if not p.exists()]  # nearest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MoefyError(f"cannot create {path.parent}: {err.strerror}") from None
    remove_stale_temporaries(path)
    try:
        tmp = temporary_sibling(path)
    except OSError as err:
        raise MoefyError(f"cannot write beside {path}: {err.strerror}") from None
    target = tmp / path.name
    done = False
    try:
        yield target
        if kind == FOLDER:
            if not target.is_dir():
                raise RuntimeError(f"atomic_path({path}) expected a folder at {target}")
            write_output_marker(target)
        elif target.is_dir():
            raise RuntimeError(f"atomic_path({path}) expected a file at {target}")
        _commit(target, path, kind, overwrite)
        done = True
    except Exception as err:
        reason = _storage_problem(err)
        if reason is None:
            raise
        raise MoefyError(f"cannot write {path}: {reason}; nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in [] if done else new_parents:  # leave no empty folder of ours behind
            with contextlib.suppress(OSError):
                parent.rmdir()


# errors of the storage, not of moefy: the user frees space or picks another place
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def _storage_problem(err: Exception) -> str | None:
    """What is wrong with the storage if ``err`` says so, else None. Writers outside Python's
    ``OSError`` (safetensors' Rust serialiser) only say it in their message."""
    if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
        return err.strerror or os.strerror(err.errno)
    text = str(err)
    for code in _STORAGE_ERRNOS:
        if os.strerror(code) in text:
            return os.strerror(code)
    return None


def _commit(target: Path, path: Path, kind: OutputKind, overwrite: bool) -> None:
    """Move ``target`` onto ``path`` after checking ``path`` again (it may have changed)."""
    check_output(path, kind, overwrite=overwrite, option="output")
    if kind == FOLDER and path.is_dir() and any(path.iterdir()):
        old = temporary_sibling(path, suffix=".old")
        with _signals_held():  # no Ctrl-C or SIGTERM between the two renames
            os.replace(path, old)
            try:
                os.replace(target, path)
            except OSError:
                os.replace(old, path)
                raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(target, path)  # a file, an empty folder or nothing is replaced whole


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (they arrive afterwards) while a pair of renames runs, so an
    interruption never falls between them."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> None:
    """Write ``obj`` as indented JSON to file ``path`` atomically.

    ``overwrite`` (default True: moefy's own tables inside its folders) lets an existing file be
    replaced; a folder or special file at ``path`` is refused either way.
    """
    with atomic_path(path, FILE, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


class OutputLock:
    """An exclusive lock on an output path, held by one moefy process at a time.

    The lock is a ``flock`` on a file named after the output's absolute path in
    :data:`LOCK_DIR` (outside the user's folders, so a refused run leaves nothing there), so it
    is released when the process dies, however it dies; the file is removed on release.
    """

    def __init__(self, path: str | os.PathLike, option: str = "--out") -> None:
        self.path = Path(path)
        self.option = option
        key = hashlib.sha1(os.fsencode(os.path.realpath(self.path))).hexdigest()[:16]
        self.lock_file = LOCK_DIR / f"{key}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            MoefyError: another moefy process is writing the same output.
        """
        try:
            if not LOCK_DIR.is_dir():
                LOCK_DIR.mkdir(parents=True, exist_ok=True)
                LOCK_DIR.chmod(0o1777)  # shared by every user, as /tmp is (mkdir obeys the umask)
        except OSError as err:
            raise MoefyError(f"cannot create {LOCK_DIR}: {err.strerror}") from None
        while True:
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                raise MoefyError(f"cannot lock {self.lock_file}: {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise MoefyError(
                    f"another moefy run (pid {holder}) is writing {self.option} {self.path}: "
                    "wait for it to finish or choose another path"
                ) from None
            try:  # the holder may have removed the file between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.lock_file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        """Drop the lock and remove its file."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.lock_file.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def claim_output(
    path: str | os.PathLike | None,
    kind: OutputKind,
    *,
    overwrite: bool = False,
    resume: bool = False,
    option: str = "--out",
    writer: bool = True,
) -> Iterator[Path]:
    """Check an output before a run's work starts and hold its lock until the run ends.

    Args:
        path: the output path.
        kind: ``"file"`` or ``"folder"``.
        overwrite: see :func:`check_output`.
        resume: see :func:`check_output`.
        option: the CLI option that named the path, for the messages.
        writer: False on the processes of a distributed run that do not write (they only check).

    Raises:
        MoefyError: the path is refused, or another moefy run holds it.

    Example:
        >>> with claim_output(args.out, "folder", overwrite=args.overwrite) as out:
        ...     save(model, out, overwrite=args.overwrite)
    """
    path = check_output(path, kind, overwrite=overwrite, resume=resume, option=option)
    if not writer:
        yield path
        return
    with OutputLock(path, option):
        remove_stale_temporaries(path)
        yield path


@contextlib.contextmanager
def working_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A folder a run fills as it goes (sweep, finetune): continued when it exists, started
    afresh with ``overwrite``.

    The folder gets :data:`OUTPUT_MARKER` at once, so a run killed half-way leaves a folder moefy
    recognises and resumes. When a run with ``overwrite`` fails before writing anything, the old
    folder comes back; once it has written something (a checkpoint, a cached evaluation), its own
    progress is kept, to be resumed. A folder this run created that holds only the marker when
    it fails is removed. Check ``path`` first (:func:`check_output` with ``resume=True``).
    """
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]  # nearest first
    old = None
    try:
        if overwrite and path.is_dir() and any(path.iterdir()):
            old = temporary_sibling(path, suffix=".old")
            with _signals_held():
                os.replace(path, old)
        path.mkdir(parents=True, exist_ok=True)
        write_output_marker(path)
        yield path
    except BaseException:
        with _signals_held():
            _unwind_working_folder(path, old, created)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _unwind_working_folder(path: Path, old: Path | None, created: list[Path]) -> None:
    """After a failed run: keep its progress, or put back what was there before it."""
    entries = [p.name for p in path.iterdir()] if path.is_dir() else []
    if any(name != OUTPUT_MARKER for name in entries):
        if old is not None:  # the fresh run's progress replaces the old folder, as asked
            shutil.rmtree(old, ignore_errors=True)
        return
    if entries:
        (path / OUTPUT_MARKER).unlink()
    if old is not None:
        os.replace(old, path)  # onto the empty folder (or none)
        return
    for folder in created:  # only what this run made, and only while empty
        with contextlib.suppress(OSError):
            folder.rmdir()
