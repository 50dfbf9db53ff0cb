"""The machinery of the hostile-input suite; the fixtures are in ``conftest.py``.

- ``Assets``: the tiny inputs every case needs (a tiny Hugging Face folder, a tiny text, and the
  moefy outputs made from them by the CLI itself), built once per session on first use; cases
  read them or corrupt COPIES of them, never the originals.
- ``DiskState``: a fingerprint of every path under some roots (type, mode, size, SHA-256, link
  target), plus the few system paths a case names; two fingerprints are compared path by path.
- ``system_guard``: while a case runs, any attempt to rename, remove, create or write over
  ``/``, its direct children or anything under ``/dev``, ``/proc``, ``/sys``, ``/etc``, ``/usr``
  or the repository raises :class:`GuardTripped` instead (the suite runs as root: a broken
  output check could otherwise replace ``/dev/null``).
- ``watchdog`` stops a case that blocks (a fifo) or runs long.
- ``no_heavy_work`` (for cases that must be refused up front) makes loading a model or starting
  a benchmark raise :class:`HeavyWorkStarted`.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import os
import shutil
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tiny_models import save_tiny_hf_folder, write_word_text

EXIT_USAGE = 2  # what the CLI returns for a user mistake
CASE_SECONDS = 60  # a refused run takes well under a second; a hung one is stopped here
TEXT_DOCS, TEXT_WORDS = 200, 60  # about 12,000 tokens: every command's tiny run fits
REPO_ROOT = Path(__file__).resolve().parents[2]
# Model and data options that keep every command's run to a fraction of a second.
MODEL_DATA = ("--model", "{tiny}", "--data", "{text}", "--block-len", "32", "--batch-size", "4")


class GuardTripped(BaseException):
    """A case tried to change a system path; BaseException so no ``except OSError`` hides it."""


class HeavyWorkStarted(BaseException):
    """A case that must be refused up front loaded a model or started a benchmark."""


class CaseTimedOut(BaseException):
    """A case ran past :data:`CASE_SECONDS` (blocked on a fifo, or did the whole job)."""


# ----------------------------------------------------------------------------- assets


def _cli(*argv: str) -> None:
    """Run ``moefy ARGV`` in-process; raise with its stderr when it fails."""
    from moefy.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    if code != 0:
        lines = err.getvalue().strip().splitlines() or ["(no stderr)"]
        raise RuntimeError(f"moefy {' '.join(argv)} exited {code}: {lines[-1]}")


def _model_data(assets: Assets) -> tuple[str, ...]:
    names = {"tiny": str(assets["tiny"]), "text": str(assets["text"])}
    return tuple(arg.format_map(names) for arg in MODEL_DATA)


def _build_tiny(assets: Assets, path: Path) -> None:
    save_tiny_hf_folder(path)


def _build_text(assets: Assets, path: Path) -> None:
    write_word_text(path, docs=TEXT_DOCS, words=TEXT_WORDS)


def _build_moe(assets: Assets, path: Path) -> None:
    _cli("convert", "--model", str(assets["tiny"]), "--experts", "4", "--out", str(path))


def _build_plain_moe(assets: Assets, path: Path) -> None:
    """A moefied tiny Llama without FFN biases: what ``moefy export`` can write (Qwen2-MoE
    experts have no biases)."""
    import torch
    import transformers as T

    from tiny_models import _DEC, tiny_tokenizer

    torch.manual_seed(0)
    dense = path.parent / "tiny-llama-plain"
    T.LlamaForCausalLM(T.LlamaConfig(**_DEC)).save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    _cli("convert", "--model", str(dense), "--experts", "4", "--out", str(path))


def _build_profile(assets: Assets, path: Path) -> None:
    _cli(
        "profile",
        *_model_data(assets),
        "--tokens",
        "256",
        "--coactivation",
        "--no-plots",
        "--out",
        str(path),
    )


def _build_sweep(assets: Assets, path: Path) -> None:
    _cli(
        "sweep",
        *_model_data(assets),
        "--tokens",
        "256",
        "--methods",
        "dense,topk",
        "--levels",
        "0.5",
        "--agreement-tokens",
        "128",
        "--out",
        str(path),
    )


def _build_sparse(assets: Assets, path: Path) -> None:
    _cli(
        "sparsify",
        *_model_data(assets),
        "--method",
        "topk",
        "--eval-tokens",
        "128",
        "--out",
        str(path),
    )


def _build_dropped(assets: Assets, path: Path) -> None:
    _cli(
        "drop",
        *_model_data(assets),
        "--tokens",
        "256",
        "--blocks",
        "1",
        "--eval-tokens",
        "128",
        "--out",
        str(path),
    )


def _build_layers(assets: Assets, path: Path) -> None:
    _cli("layers", *_model_data(assets), "--tokens", "256", "--out", str(path))


def _build_finetuned(assets: Assets, path: Path) -> None:
    _cli(
        "finetune",
        *_model_data(assets),
        "--tokens",
        "256",
        "--steps",
        "1",
        "--checkpoint-every",
        "1",
        "--eval-tokens",
        "0",
        "--out",
        str(path),
    )


def _build_evaluation(assets: Assets, path: Path) -> None:
    _cli("evaluate", *_model_data(assets), "--tokens", "256", "--out", str(path))


# name -> (file or folder name under the assets root, builder)
_BUILDERS: dict[str, tuple[str, Callable[[Assets, Path], None]]] = {
    "tiny": ("tiny-llama", _build_tiny),
    "text": ("words.jsonl", _build_text),
    "moe": ("moefied", _build_moe),
    "plainmoe": ("moefied-plain", _build_plain_moe),
    "profile": ("profile", _build_profile),
    "sweep": ("sweep", _build_sweep),
    "sparse": ("sparse", _build_sparse),
    "dropped": ("dropped", _build_dropped),
    "layers": ("layers", _build_layers),
    "ft": ("finetuned", _build_finetuned),
    "evaluation": ("evaluation.json", _build_evaluation),
}
ASSET_NAMES = tuple(_BUILDERS)


class Assets:
    """The session's tiny inputs, each built on first use (``assets["moe"]`` is its path).

    A build that fails is remembered: every case that needs it fails at once with the reason,
    and cases that do not need it still run.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._failed: dict[str, str] = {}

    def __getitem__(self, name: str) -> Path:
        file_name, build = _BUILDERS[name]
        path = self.root / file_name
        if name in self._failed:
            pytest.fail(f"asset {name!r} could not be built: {self._failed[name]}")
        if not path.exists():
            try:
                build(self, path)
            except Exception as err:  # noqa: BLE001 - any failure is reported to every user
                shutil.rmtree(path, ignore_errors=True)
                self._failed[name] = f"{type(err).__name__}: {err}"
                pytest.fail(f"asset {name!r} could not be built: {self._failed[name]}")
        return path

    def built(self) -> list[Path]:
        """The assets built so far (what the cases may have read)."""
        return [
            self.root / file_name
            for file_name, _ in _BUILDERS.values()
            if (self.root / file_name).exists()
        ]


# ----------------------------------------------------------------------------- disk state


def _entry(path: Path) -> tuple:
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return ("symlink", os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", mode)
    if stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    digest.update(chunk)
        except PermissionError:  # a row took the permission away (not as root)
            return ("file", mode, st.st_size, "unreadable")
        return ("file", mode, st.st_size, digest.hexdigest())
    return ("special", stat.S_IFMT(st.st_mode), mode, st.st_rdev)  # fifo, device: never opened


def tree_state(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (``root`` itself too), never following links."""
    state = {".": _entry(root)}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder, name)
            state[path.relative_to(root).as_posix()] = _entry(path)
    return state


def system_state(paths: tuple[str, ...]) -> dict[str, Any]:
    """The names in ``/`` and ``/dev`` and the type of each system path a case names."""
    state: dict[str, Any] = {
        "ls /": sorted(os.listdir("/")),
        "ls /dev": sorted(os.listdir("/dev")),
    }
    for path in paths:
        try:
            st = os.lstat(path)
            state[path] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_rdev)
        except OSError as err:
            state[path] = ("absent", err.errno)
    return state


class DiskState:
    """Fingerprints of the roots a case may touch, taken before and after it runs."""

    def __init__(self, roots: list[Path], system_paths: tuple[str, ...] = ()) -> None:
        self.roots = roots
        self.system_paths = system_paths

    def take(self) -> dict[str, Any]:
        state: dict[str, Any] = {str(root): tree_state(root) for root in self.roots}
        state["system"] = system_state(self.system_paths)
        return state

    @staticmethod
    def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
        """What differs, one line per path (``+`` added, ``-`` removed, ``~`` changed)."""
        lines = []
        for key in before:
            old, new = before[key], after[key]
            if key == "system":
                lines += [
                    f"~ {name}: {old[name]} -> {new[name]}"
                    for name in old
                    if old[name] != new[name]
                ]
                continue
            for rel in sorted(set(old) | set(new)):
                if rel not in new:
                    lines.append(f"- {key}/{rel}")
                elif rel not in old:
                    lines.append(f"+ {key}/{rel} ({new[rel][0]})")
                elif old[rel] != new[rel]:
                    lines.append(f"~ {key}/{rel}: {old[rel][:3]} -> {new[rel][:3]}")
        return lines


# ----------------------------------------------------------------------------- verdicts


def refusal_problems(code: int, err: str, expect: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with a refusal: exit 2 and one stderr line with ``error:``, no traceback,
    naming one of ``expect`` (case-insensitive); [] when nothing is."""
    lines = [line for line in err.split("\n") if line.strip()]
    first = lines[0] if lines else "(empty stderr)"
    message = first.split("error:", 1)[-1]  # "moefy CMD: error:" names nothing
    if "Traceback" in err:
        return [f"traceback on stderr: {lines[-1]}"]
    problems = []
    if code != EXIT_USAGE:
        problems.append(f"exit {code}, expected {EXIT_USAGE}; stderr: {first[:200]}")
    elif len(lines) != 1:
        problems.append(f"stderr has {len(lines)} lines, expected 1: {err[-400:]!r}")
    elif "error:" not in first:
        problems.append(f"no 'error:' in {first!r}")
    elif expect and not any(word.lower() in message.lower() for word in expect):
        problems.append(f"the error names none of {expect}: {first}")
    return problems


# ----------------------------------------------------------------------------- guards

_PROTECTED_TREES = (
    "/dev",
    "/proc",
    "/sys",
    "/etc",
    "/usr",
    "/boot",
    "/bin",
    "/sbin",
    "/lib",
    str(REPO_ROOT),
)


def _protected(path: Any) -> bool:
    if isinstance(path, int):  # a file descriptor
        return False
    try:
        text = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return False
    if text == "/" or os.path.dirname(text) == "/":
        return True
    return any(text == tree or text.startswith(tree + "/") for tree in _PROTECTED_TREES)


def _refuse(action: str, path: Any) -> None:
    raise GuardTripped(f"the case tried to {action} {os.fsdecode(path)!r}")


def _wrap_paths(action: str, function: Callable, arg_positions: tuple[int, ...]) -> Callable:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("dir_fd") is None and kwargs.get("src_dir_fd") is None:
            for position in arg_positions:
                if position < len(args) and _protected(args[position]):
                    _refuse(action, args[position])
        return function(*args, **kwargs)

    return guarded


def _is_write_mode(mode: str) -> bool:
    return any(flag in mode for flag in "wax+")


def _wrap_open(function: Callable) -> Callable:
    def guarded(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if _is_write_mode(mode) and _protected(file) and not _is_device(file):
            _refuse(f"open for writing ({mode})", file)
        return function(file, mode, *args, **kwargs)

    return guarded


def _wrap_os_open(function: Callable) -> Callable:
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded(path: Any, flags: int, *args: Any, **kwargs: Any) -> Any:
        unguarded = kwargs.get("dir_fd") is not None or not flags & writing
        if not unguarded and _protected(path) and not _is_device(path):
            _refuse("open for writing", path)
        return function(path, flags, *args, **kwargs)

    return guarded


def _is_device(path: Any) -> bool:
    """Writing into a character device (``/dev/null``, ``/dev/full``) harms nothing; replacing
    or removing one does, and stays refused."""
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except (OSError, TypeError, ValueError):
        return False


@contextlib.contextmanager
def system_guard() -> Iterator[None]:
    """Refuse changes to system paths (see the module docstring) while the block runs."""
    patches = [
        (os, "replace", _wrap_paths("replace", os.replace, (0, 1))),
        (os, "rename", _wrap_paths("rename", os.rename, (0, 1))),
        (os, "unlink", _wrap_paths("remove", os.unlink, (0,))),
        (os, "remove", _wrap_paths("remove", os.remove, (0,))),
        (os, "rmdir", _wrap_paths("remove", os.rmdir, (0,))),
        (os, "mkdir", _wrap_paths("create a folder at", os.mkdir, (0,))),
        (os, "symlink", _wrap_paths("create a link at", os.symlink, (1,))),
        (os, "link", _wrap_paths("create a link at", os.link, (1,))),
        (os, "chmod", _wrap_paths("chmod", os.chmod, (0,))),
        (os, "truncate", _wrap_paths("truncate", os.truncate, (0,))),
        (os, "open", _wrap_os_open(os.open)),
        (shutil, "rmtree", _wrap_paths("remove the tree", shutil.rmtree, (0,))),
        (shutil, "move", _wrap_paths("move", shutil.move, (0, 1))),
        (builtins, "open", _wrap_open(builtins.open)),
        (io, "open", _wrap_open(io.open)),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


@contextlib.contextmanager
def watchdog(seconds: float = CASE_SECONDS) -> Iterator[None]:
    """Raise :class:`CaseTimedOut` in the case's thread after ``seconds``."""

    def expire(signum: int, frame: Any) -> None:
        raise CaseTimedOut(f"the case ran for more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Where heavy work starts: every command loads its model through load_model, bench through these.
_HEAVY_ENTRY_POINTS = (
    ("moefy.models.load", "load_model"),
    ("moefy.bench", "run_bench"),
    ("moefy.bench", "run_gpu_bench"),
)


@contextlib.contextmanager
def no_heavy_work() -> Iterator[None]:
    """Make loading a model or starting a benchmark raise :class:`HeavyWorkStarted`."""
    import importlib

    saved = []
    for module_name, name in _HEAVY_ENTRY_POINTS:
        module = importlib.import_module(module_name)

        def tripwire(*args: Any, _name: str = f"{module_name}.{name}", **kwargs: Any) -> Any:
            raise HeavyWorkStarted(f"{_name} was called before the input was refused")

        saved.append((module, name, getattr(module, name)))
        setattr(module, name, tripwire)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
