"""The CLI rows of the hostile-input suite: one :class:`CliCase` per bad or hostile input.

Every row runs through the one tester in ``test_hostile_cli.py``: exit code 2, one stderr line
with ``error:`` and no traceback, and nothing on disk changed. A row is the command's tiny,
otherwise valid arguments (:data:`BASE`) plus the hostile part; ``{tiny}``, ``{moe}``... name
the session's assets (see ``conftest.py``), and relative paths live in the case's scratch folder
(its working directory), where the row's ``setup`` builds what it needs: corrupt copies of the
assets, a user's folder, a fifo, links. ``early`` rows must be refused before any model loads.

Groups: outputs (every subcommand's --out / --results against every hostile path), numbers,
choices and argument combinations, models, texts, moefied and other moefy folders, profiles,
reports, sweeps, finetune checkpoints, concurrent writers. A new hostile input is a new row.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostile_support import MODEL_DATA, Assets

Setup = Callable[[Path, Assets], None]

FILE, FOLDER = "file", "folder"
USER_FILE_TEXT = "a user's notes: moefy must never remove or change this file\n"


@dataclass(frozen=True)
class CliCase:
    """One hostile CLI input.

    Attributes:
        id: the pytest id: ``group-command-what``.
        argv: the arguments after ``moefy``, with ``{asset}`` placeholders.
        setup: builds the case's files in its scratch folder, in order.
        expect: the error line names at least one of these (case-insensitive); empty: any line.
        early: the input must be refused before any model is loaded or benchmark started.
    """

    id: str
    argv: tuple[str, ...]
    setup: tuple[Setup, ...] = ()
    expect: tuple[str, ...] = ()
    early: bool = False


# ----------------------------------------------------------------------------- set-up helpers


def user_folder(name: str) -> Setup:
    """A folder the user made, with a file inside that must survive."""

    def setup(scratch: Path, assets: Assets) -> None:
        (scratch / name).mkdir(parents=True)
        (scratch / name / "notes.txt").write_text(USER_FILE_TEXT)

    return setup


def user_file(name: str, content: str | bytes = USER_FILE_TEXT) -> Setup:
    def setup(scratch: Path, assets: Assets) -> None:
        path = scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")

    return setup


def symlink(name: str, target: str) -> Setup:
    def setup(scratch: Path, assets: Assets) -> None:
        os.symlink(target, scratch / name)

    return setup


def fifo(name: str) -> Setup:
    def setup(scratch: Path, assets: Assets) -> None:
        os.mkfifo(scratch / name)

    return setup


def copy_asset(asset: str, name: str) -> Setup:
    """A copy of a session asset, free to corrupt."""

    def setup(scratch: Path, assets: Assets) -> None:
        source = assets[asset]
        if source.is_dir():
            shutil.copytree(source, scratch / name, symlinks=True)
        else:
            shutil.copy2(source, scratch / name)

    return setup


def remove(name: str) -> Setup:
    def setup(scratch: Path, assets: Assets) -> None:
        path = scratch / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    return setup


def edit_json(name: str, edit: Callable[[Any], Any]) -> Setup:
    """Rewrite a JSON file: ``edit`` changes the loaded value in place or returns a new one."""

    def setup(scratch: Path, assets: Assets) -> None:
        path = scratch / name
        value = json.loads(path.read_text())
        changed = edit(value)
        path.write_text(json.dumps(value if changed is None else changed))

    return setup


def every_layer(**fields: Any) -> Callable[[dict], None]:
    """An edit of ``moefy_config.json`` that sets ``fields`` in every layer record."""

    def edit(record: dict) -> None:
        for layer in record["layers"]:
            layer.update(fields)

    return edit


def set_keys(**fields: Any) -> Callable[[dict], None]:
    def edit(record: dict) -> None:
        record.update(fields)

    return edit


def truncate(name: str, keep: float = 0.5) -> Setup:
    def setup(scratch: Path, assets: Assets) -> None:
        path = scratch / name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return setup


def garbage(name: str, size: int = 4096) -> Setup:
    """Replace a file by seeded random bytes of ``size``."""

    def setup(scratch: Path, assets: Assets) -> None:
        import random

        (scratch / name).write_bytes(random.Random(size).randbytes(size))

    return setup


def poison_weights(folder: str, value: float) -> Setup:
    """Put ``value`` (nan, inf) into one element of every floating tensor of a safetensors."""

    def setup(scratch: Path, assets: Assets) -> None:
        from safetensors.torch import load_file, save_file

        path = scratch / folder / "model.safetensors"
        tensors = load_file(path)
        for tensor in tensors.values():
            if tensor.is_floating_point():
                tensor.view(-1)[0] = value
        save_file(tensors, path, metadata={"format": "pt"})

    return setup


def reshape_weight(folder: str) -> Setup:
    """Give the first matrix of a safetensors file a wrong shape."""

    def setup(scratch: Path, assets: Assets) -> None:
        from safetensors.torch import load_file, save_file

        path = scratch / folder / "model.safetensors"
        tensors = load_file(path)
        name = next(n for n, t in tensors.items() if t.dim() == 2)
        tensors[name] = tensors[name][:, :-1].contiguous()
        save_file(tensors, path, metadata={"format": "pt"})

    return setup


class RunsCode:
    """Unpickling this creates the folder ``proof``: evidence that a load ran the file's code."""

    def __init__(self, proof: str) -> None:
        self.proof = proof

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.proof,))


PROOF = "CODE-RAN"  # the folder a crafted pickle creates in the scratch folder when it runs


def crafted_pickle(name: str, wrap: Callable[[Any], Any] = lambda payload: payload) -> Setup:
    """A torch.save file whose unpickling runs code (see :class:`RunsCode`)."""

    def setup(scratch: Path, assets: Assets) -> None:
        import torch

        path = scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(wrap(RunsCode(str(scratch / PROOF))), path)

    return setup


def torch_file(name: str, value: Any) -> Setup:
    def setup(scratch: Path, assets: Assets) -> None:
        import torch

        torch.save(value, scratch / name)

    return setup


HELD_LOCKS: list = []  # released after every case by conftest's _release_locks


def another_writer(name: str) -> Setup:
    """Hold moefy's output lock on ``name`` as a second, concurrent moefy run would."""

    def setup(scratch: Path, assets: Assets) -> None:
        from moefy.io import OutputLock

        lock = OutputLock(scratch / name)
        lock.acquire()
        HELD_LOCKS.append(lock)

    return setup


def nested_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


# ----------------------------------------------------------------------------- base arguments

# Tiny, valid arguments per command; test_hostile_cli checks that each one succeeds as given.
BASE: dict[str, tuple[str, ...]] = {
    "profile": ("profile", *MODEL_DATA, *"--tokens 256 --no-plots".split()),
    "convert": ("convert", *"--model {tiny} --experts 4".split()),
    "splits": (
        "splits",
        *MODEL_DATA,
        *"--tokens 256 --experts 4 --methods random,params --fractions 0.5".split(),
    ),
    "train-routers": (
        "train-routers",
        *"--model {moe} --data {text} --block-len 32 --batch-size 4 --tokens 256".split(),
        *"--epochs 1 --hidden 8 --eval-tokens 128 --fractions 0.5 --taus 0.9".split(),
    ),
    "sparsify": ("sparsify", *MODEL_DATA, *"--method topk --eval-tokens 128".split()),
    "bench": (
        "bench",
        *"--model {tiny} --only decode --quick --rounds 1 --new-tokens 2 --threads 1".split(),
    ),
    "evaluate": ("evaluate", *MODEL_DATA, *"--tokens 256".split()),
    "sweep": (
        "sweep",
        *MODEL_DATA,
        *"--tokens 256 --methods dense,topk --levels 0.5 --agreement-tokens 128".split(),
    ),
    "report": ("report", "{sweep}"),
    "layers": ("layers", *MODEL_DATA, *"--tokens 256".split()),
    "drop": ("drop", *MODEL_DATA, *"--tokens 256 --blocks 1 --eval-tokens 128".split()),
    "finetune": ("finetune", *MODEL_DATA, *"--tokens 256 --steps 1 --eval-tokens 0".split()),
    "export": (
        "export",
        *"--model {plainmoe} --data {text} --block-len 32 --batch-size 4 --tokens 256".split(),
        *"--keep 0.5 --eval-tokens 128".split(),
    ),
    "generate": (
        "generate",
        *"--model {moe} --max-new-tokens 4 --backend reference --prompt".split(),
        "the market",
    ),
}


def base(
    command: str,
    *extra: str,
    model: str | None = None,
    data: str | None = None,
    drop: tuple[str, ...] = (),
) -> tuple[str, ...]:
    """``BASE[command]`` with ``--model`` / ``--data`` replaced, options in ``drop`` removed
    (each with its value) and ``extra`` appended."""
    argv = list(BASE[command])
    for option, value in (("--model", model), ("--data", data)):
        if value is not None:
            argv[argv.index(option) + 1] = value
    for option in drop:
        at = argv.index(option)
        del argv[at : at + 2]
    return (*argv, *extra)


# ----------------------------------------------------------------------------- outputs

# (command, option, kind, an earlier output of the same command to copy, or None where the
# command resumes into its folder or adds to its file, so an existing one is no mistake)
OUTPUTS = (
    ("profile", "--out", FOLDER, "profile"),
    ("convert", "--out", FOLDER, "moe"),
    ("splits", "--results", FILE, None),
    ("train-routers", "--out", FOLDER, "moe"),
    ("train-routers", "--results", FILE, None),
    ("sparsify", "--out", FOLDER, "sparse"),
    ("bench", "--out", FILE, "evaluation"),
    ("evaluate", "--out", FILE, "evaluation"),
    ("sweep", "--out", FOLDER, None),
    ("report", "--out", FILE, "evaluation"),
    ("layers", "--out", FOLDER, "layers"),
    ("drop", "--out", FOLDER, "dropped"),
    ("finetune", "--out", FOLDER, None),
    ("export", "--out", FOLDER, "moe"),
)

LONG_NAME = "n" * 256  # one byte over NAME_MAX


def _output_rows(kind: str, earlier: str | None) -> list[tuple[str, str, tuple[Setup, ...], bool]]:
    """(what, path, setup, with --overwrite) of every hostile output path for ``kind``."""
    rows = [
        ("empty", "", (), False),
        ("dotdot", "sub/..", (user_folder("sub"),), False),
        ("dot", ".", (user_file("notes.txt"),), False),
        ("root", "/", (), False),
        ("proc", "/proc/self/x", (), False),
        ("dev-full", "/dev/full", (), False),
        ("dev-null", "/dev/null", (), False),
        ("link-to-device", "devlink", (symlink("devlink", "/dev/null"),), False),
        (
            "link-to-folder",
            "dirlink",
            (user_folder("realdir"), symlink("dirlink", "realdir")),
            False,
        ),
        ("fifo", "pipe", (fifo("pipe"),), False),
        ("long-name", LONG_NAME if kind == FOLDER else LONG_NAME[:-5] + ".json", (), False),
        ("parent-is-file", "notes.txt/out", (user_file("notes.txt"),), False),
    ]
    if kind == FOLDER:
        rows += [
            ("user-folder", "mywork", (user_folder("mywork"),), False),
            ("user-folder-overwrite", "mywork", (user_folder("mywork"),), True),
            ("file-for-folder", "notes.txt", (user_file("notes.txt"),), False),
        ]
    else:
        rows += [
            ("folder-for-file", "mywork", (user_folder("mywork"),), False),
            ("folder-for-file-overwrite", "mywork", (user_folder("mywork"),), True),
        ]
    if earlier is not None:
        name = "earlier" if kind == FOLDER else "earlier.json"
        rows.append(("earlier-output", name, (copy_asset(earlier, name),), False))
    return rows


def output_cases() -> list[CliCase]:
    cases = []
    for command, option, kind, earlier in OUTPUTS:
        for what, path, setup, overwrite in _output_rows(kind, earlier):
            if overwrite and command == "splits":  # no --overwrite: its rows are added
                continue
            tag = command if option == "--out" else f"{command}{option.replace('--', '-')}"
            argv = base(command, option, path, *(("--overwrite",) if overwrite else ()))
            cases.append(
                CliCase(f"out-{tag}-{what}", argv, setup, expect=(option, "output"), early=True)
            )
    return cases


# ----------------------------------------------------------------------------- numbers

# (command, option, bad values): every numeric option, with 0, -1, nan, inf, 1e30 and text
# spread over them (all six on the options every command shares).
NUMBERS = (
    ("profile", "--tokens", ("0", "-1", "nan", "inf", "1e30", "text")),
    ("profile", "--block-len", ("0", "1")),
    ("profile", "--batch-size", ("-1",)),
    ("profile", "--active-share", ("0", "1", "nan")),
    ("profile", "--top-share", ("0", "1.5")),
    ("profile", "--pattern-tokens", ("-1",)),
    ("convert", "--experts", ("0", "1e30")),
    ("convert", "--expert-size", ("-1",)),
    ("convert", "--size-multiple", ("0",)),
    ("convert", "--seed", ("text",)),
    ("convert", "--shared", ("1.0", "-0.5", "nan")),
    ("convert", "--tokens", ("0", "nan")),
    ("splits", "--experts", ("inf",)),
    ("splits", "--fractions", ("0", "nan", "1.5", "")),
    ("splits", "--keep", ("0", "inf", "text")),
    ("train-routers", "--hidden", ("0",)),
    ("train-routers", "--representatives", ("0", "-1")),
    ("train-routers", "--epochs", ("-1",)),
    ("train-routers", "--rounds", ("nan",)),
    ("train-routers", "--seed", ("1e30",)),
    ("train-routers", "--eval-tokens", ("-1",)),
    ("train-routers", "--fractions", ("2",)),
    ("train-routers", "--keep", ("2", "nan")),
    ("train-routers", "--taus", ("nan",)),
    ("sparsify", "--sparsity", ("1", "-0.1", "nan")),
    ("sparsify", "--calibration-passes", ("0",)),
    ("sparsify", "--rank", ("0", "-1", "text")),
    ("export", "--keep", ("0", "1.5", "nan")),
    ("export", "--eval-tokens", ("-1",)),
    ("export", "--logit-spread", ("0", "-1", "nan", "inf", "text")),
    ("sparsify", "--eval-tokens", ("text",)),
    ("generate", "--max-new-tokens", ("0", "1")),
    ("generate", "--threads", ("-1",)),
    ("generate", "--rounds", ("0",)),
    ("bench", "--threads", ("0", "")),
    ("bench", "--rounds", ("nan",)),
    ("bench", "--new-tokens", ("-1",)),
    ("bench", "--layers", ("0",)),
    ("evaluate", "--agreement-tokens", ("0",)),
    ("evaluate", "--classify-examples", ("-1",)),
    ("evaluate", "--batch-size", ("1e30",)),
    ("sweep", "--levels", ("0", "-1", "nan", "inf", "1.5", "text")),
    ("sweep", "--calibration-tokens", ("0",)),
    ("sweep", "--experts", ("-1",)),
    ("layers", "--eval-tokens", ("0",)),
    ("drop", "--attention", ("-1",)),
    ("drop", "--mlp", ("text",)),
    ("drop", "--blocks", ("nan",)),
    ("drop", "--speedup", ("0.5", "nan", "inf")),
    ("drop", "--eval-tokens", ("0",)),
    ("finetune", "--lr", ("0", "-1", "nan", "inf", "text")),
    ("finetune", "--fatrelu", ("-1", "inf")),
    ("finetune", "--reg-weight", ("inf",)),
    ("finetune", "--reg-stages", ("0",)),
    ("finetune", "--distill", ("nan",)),
    ("finetune", "--fraction", ("1",)),
    ("finetune", "--keep", ("1", "-1")),
    ("finetune", "--tau", ("0",)),
    ("finetune", "--router-loss", ("-1",)),
    ("finetune", "--router-lr", ("0",)),
    ("finetune", "--efficiency", ("inf",)),
    ("finetune", "--straight-through", ("-1",)),
    ("finetune", "--minutes", ("nan",)),
    ("finetune", "--steps", ("-1",)),
    ("finetune", "--train-tokens", ("0",)),
    ("finetune", "--grad-accum", ("0",)),
    ("finetune", "--checkpoint-every", ("1e30",)),
    ("finetune", "--eval-tokens", ("-1",)),
)

# Values the argument parser accepts today but that the command must still refuse; the rest
# are refused by argparse or a config before any work.
# What the error must name besides the option itself (the tiny model's 2 blocks make every
# --speedup above 1 too much, which is refused in terms of blocks skipped).
_ALSO_NAMED = {"--levels": ("level",), "--speedup": ("skip",)}
_CHECKED_LATE = {
    ("drop", "--speedup", "nan"),
    ("drop", "--speedup", "inf"),
    ("generate", "--max-new-tokens", "1"),
    ("profile", "--block-len", "1"),
}


def number_cases() -> list[CliCase]:
    cases = []
    for command, option, values in NUMBERS:
        for value in values:
            what = value.replace(".", "p").replace("-", "minus") or "empty"
            argv = (*base(command), option, value)
            if command == "drop" and option == "--speedup":
                argv = (*base(command, drop=("--blocks",)), option, value)
            early = (command, option, value) not in _CHECKED_LATE
            expect = (option, *_ALSO_NAMED.get(option, ()))
            cases.append(
                CliCase(f"num-{command}{option[1:]}-{what}", argv, expect=expect, early=early)
            )
    return cases


# ----------------------------------------------------------------------------- choices, combos

CHOICES = (
    CliCase(
        "choice-convert-method",
        (*base("convert"), "--method", "kmeans"),
        early=True,
        expect=("--method",),
    ),
    CliCase(
        "choice-sparsify-method",
        (*base("sparsify"), "--method", "magic"),
        early=True,
        expect=("--method",),
    ),
    CliCase(
        "choice-profile-active-rule",
        (*base("profile"), "--active-rule", "psychic"),
        early=True,
        expect=("--active-rule",),
    ),
    CliCase(
        "choice-routers-router",
        (*base("train-routers"), "--router", "oracle"),
        early=True,
        expect=("--router",),
    ),
    CliCase(
        "combo-routers-representatives-over-expert-size",
        (*base("train-routers"), "--router", "analytic", "--representatives", "999"),
        expect=("representatives",),
    ),
    CliCase(
        "choice-routers-loss",
        (*base("train-routers"), "--loss", "hinge"),
        early=True,
        expect=("--loss",),
    ),
    CliCase(
        "choice-finetune-reg", (*base("finetune"), "--reg", "l0"), early=True, expect=("--reg",)
    ),
    CliCase(
        "choice-finetune-train",
        (*base("finetune"), "--train", "experts"),
        early=True,
        expect=("--train",),
    ),
    CliCase(
        "choice-generate-backend",
        (*base("generate"), "--backend", "cuda"),
        early=True,
        expect=("--backend",),
    ),
    CliCase(
        "choice-bench-only", (*base("bench"), "--only", "memory"), early=True, expect=("--only",)
    ),
    CliCase(
        "choice-evaluate-dtype",
        (*base("evaluate"), "--dtype", "int8"),
        early=True,
        expect=("--dtype",),
    ),
    CliCase(
        "choice-profile-device",
        (*base("profile"), "--device", "tpu"),
        early=True,
        expect=("--device",),
    ),
    CliCase(
        "choice-convert-device-index",
        (*base("convert"), "--device", "cuda:x"),
        early=True,
        expect=("--device",),
    ),
    CliCase(
        "choice-sweep-methods",
        base("sweep", "--methods", "dense,psychic"),
        early=True,
        expect=("psychic",),
    ),
    CliCase("choice-sweep-methods-empty", (*base("sweep"), "--methods", ","), early=True),
    CliCase(
        "choice-splits-methods",
        (*base("splits"), "--methods", "random,psychic"),
        early=True,
        expect=("psychic",),
    ),
    CliCase(
        "choice-evaluate-tasks",
        (*base("evaluate"), "--tasks", "perplexity,mind-reading"),
        early=True,
        expect=("mind-reading",),
    ),
    CliCase(
        "choice-sparsify-budget",
        (*base("sparsify"), "--method", "teal", "--budget", "everywhere"),
        early=True,
        expect=("--budget",),
    ),
    CliCase(
        "choice-sparsify-centre",
        (*base("sparsify"), "--method", "teal", "--centre", "middle"),
        early=True,
        expect=("--centre",),
    ),
    CliCase(
        "combo-sparsify-rank-over-matrix",
        (*base("sparsify"), "--method", "lowrank", "--rank", "100000", "--tokens", "2048"),
        expect=("rank",),
    ),
    CliCase(
        "combo-sparsify-centre-on-cats",
        (*base("sparsify"), "--method", "cats", "--centre", "mode"),
        early=True,
        expect=("--centre",),
    ),
    CliCase(
        "combo-sparsify-global-without-greedy",
        (*base("sparsify"), "--method", "teal", "--budget", "global", "--no-greedy"),
        early=True,
        expect=("greedy",),
    ),
    CliCase(
        "choice-export-format",
        (*base("export"), "--format", "onnx", "--out", "new"),
        early=True,
        expect=("onnx",),
    ),
    CliCase(
        "combo-export-dense-model",
        base("export", "--out", "new", model="{tiny}"),
        expect=("moefied", "convert"),
    ),
    CliCase(
        "combo-export-q8-hf",
        (*base("export"), "--dtype", "q8_0", "--out", "new"),
        early=True,
        expect=("q8_0",),
    ),
    CliCase(
        "choice-sweep-variant-field",
        (*base("sweep"), "--methods", "dense,teal:colour=red"),
        early=True,
        expect=("colour",),
    ),
    CliCase(
        "choice-sweep-variant-form",
        (*base("sweep"), "--methods", "dense,teal:attention"),
        early=True,
        expect=("FIELD=VALUE",),
    ),
    CliCase(
        "choice-bench-methods",
        (*base("bench"), "--methods", "psychic"),
        early=True,
        expect=("psychic",),
    ),
    CliCase(
        "choice-sweep-level-method",
        (*base("sweep"), "--level", "psychic=0.5"),
        early=True,
        expect=("psychic",),
    ),
    CliCase("choice-sweep-level-empty-levels", (*base("sweep"), "--level", "topk="), early=True),
    CliCase(
        "choice-sweep-level-no-method",
        (*base("sweep"), "--level", "=0.5"),
        early=True,
        expect=("--level",),
    ),
    CliCase("choice-sweep-level-nan", (*base("sweep"), "--level", "topk=nan"), early=True),
    CliCase("choice-unknown-command", ("moefify",), early=True, expect=("moefify",)),
    CliCase(
        "choice-unknown-option", (*base("profile"), "--tokns", "5"), early=True, expect=("--tokns",)
    ),
    CliCase(
        "combo-convert-experts-and-size",
        (*base("convert"), "--expert-size", "8"),
        early=True,
        expect=("--expert-size", "--experts"),
    ),
    CliCase(
        "combo-drop-skip-and-speedup",
        (*base("drop"), "--skip", "1", "--speedup", "2"),
        early=True,
        expect=("--speedup", "--skip"),
    ),
    CliCase("combo-drop-nothing", base("drop", drop=("--blocks",)), early=True),
    CliCase(
        "combo-evaluate-agreement-no-dense",
        (*base("evaluate"), "--tasks", "agreement"),
        early=True,
        expect=("--dense",),
    ),
    CliCase(
        "combo-splits-coactivation-no-profile",
        (*base("splits"), "--methods", "coactivation"),
        early=True,
        expect=("--profile",),
    ),
    CliCase(
        "combo-convert-coactivation-no-profile",
        (*base("convert"), "--method", "coactivation"),
        early=True,
        expect=("--profile",),
    ),
    CliCase(
        "combo-convert-shared-no-profile",
        (*base("convert"), "--shared", "0.25"),
        early=True,
        expect=("--profile",),
    ),
    CliCase(
        "combo-convert-unknown-router",
        (*base("convert"), "--router", "telepathy"),
        early=True,
        expect=("--router",),
    ),
    CliCase(
        "combo-drop-more-blocks-than-model",
        (*base("drop"), "--blocks", "99"),
        expect=("--blocks", "99"),
    ),
    CliCase(
        "combo-finetune-fraction-on-dense",
        (*base("finetune"), "--fraction", "0.5"),
        expect=("--fraction",),
    ),
    CliCase(
        "combo-finetune-relufy-on-moefied",
        (*base("finetune", model="{moe}"), "--relufy"),
        expect=("relufy", "moefied"),
    ),
    CliCase("combo-routers-on-dense", base("train-routers", model="{tiny}"), expect=("convert",)),
    CliCase("combo-generate-empty-prompt", base("generate", "--prompt", ""), expect=("prompt",)),
)


# ----------------------------------------------------------------------------- models


def _tiny_copy(name: str = "m") -> Setup:
    return copy_asset("tiny", name)


MODELS = (
    CliCase("model-evaluate-empty-name", base("evaluate", model=""), expect=("model",)),
    CliCase(
        "model-profile-missing", base("profile", model="no/such/folder"), expect=("no/such/folder",)
    ),
    CliCase(
        "model-convert-hub-id", base("convert", model="someorg/some-model"), expect=("download",)
    ),
    CliCase(
        "model-layers-text-file",
        base("layers", model="notes.txt"),
        (user_file("notes.txt"),),
        expect=("notes.txt",),
    ),
    CliCase("model-splits-device-node", base("splits", model="/dev/zero"), expect=("/dev/zero",)),
    CliCase(
        "model-evaluate-no-config",
        base("evaluate", model="m"),
        (_tiny_copy(), remove("m/config.json")),
        expect=("config.json",),
    ),
    CliCase(
        "model-profile-config-bad-json",
        base("profile", model="m"),
        (_tiny_copy(), user_file("m/config.json", '{"model_type": "llama",')),
        expect=("config.json",),
    ),
    CliCase(
        "model-convert-config-list",
        base("convert", model="m"),
        (_tiny_copy(), user_file("m/config.json", "[1, 2]")),
        expect=("config.json",),
    ),
    CliCase(
        "model-evaluate-unknown-model-type",
        base("evaluate", model="m"),
        (_tiny_copy(), edit_json("m/config.json", set_keys(model_type="psychic-lm"))),
        expect=("psychic-lm",),
    ),
    CliCase(
        "model-sparsify-config-no-model-type",
        base("sparsify", model="m"),
        (_tiny_copy(), edit_json("m/config.json", lambda c: c.pop("model_type") and None)),
        expect=("config.json", "model_type"),
    ),
    CliCase(
        "model-drop-config-bad-values",
        base("drop", model="m"),
        (_tiny_copy(), edit_json("m/config.json", set_keys(num_hidden_layers=-2))),
    ),
    CliCase(
        "model-evaluate-truncated-weights",
        base("evaluate", model="m"),
        (_tiny_copy(), truncate("m/model.safetensors")),
        expect=("model.safetensors",),
    ),
    CliCase(
        "model-profile-garbage-weights",
        base("profile", model="m"),
        (_tiny_copy(), garbage("m/model.safetensors")),
        expect=("model.safetensors",),
    ),
    CliCase(
        "model-convert-empty-weights",
        base("convert", model="m"),
        (_tiny_copy(), user_file("m/model.safetensors", b"")),
        expect=("model.safetensors",),
    ),
    CliCase(
        "model-layers-no-weights",
        base("layers", model="m"),
        (_tiny_copy(), remove("m/model.safetensors")),
        expect=("weights", "safetensors"),
    ),
    CliCase(
        "model-evaluate-pickle-bin",
        base("evaluate", model="m"),
        (_tiny_copy(), remove("m/model.safetensors"), crafted_pickle("m/pytorch_model.bin")),
        expect=("pytorch_model.bin",),
    ),
    CliCase(
        "model-evaluate-nan-weights",
        base("evaluate", model="m"),
        (_tiny_copy(), poison_weights("m", float("nan"))),
        expect=("model.safetensors", "nan"),
    ),
    CliCase(
        "model-profile-inf-weights",
        base("profile", model="m"),
        (_tiny_copy(), poison_weights("m", float("inf"))),
        expect=("model.safetensors", "inf"),
    ),
    CliCase(
        "model-convert-wrong-shape",
        base("convert", model="m"),
        (_tiny_copy(), reshape_weight("m")),
        expect=("model.safetensors", "shape"),
    ),
    CliCase(
        "model-drop-tokenizer-garbage",
        base("drop", model="m"),
        (_tiny_copy(), garbage("m/tokenizer.json")),
        expect=("tokenizer",),
    ),
    CliCase("model-generate-missing", base("generate", model="gone"), expect=("gone",)),
    CliCase(
        "model-sweep-user-folder",
        base("sweep", model="mywork"),
        (user_folder("mywork"),),
        expect=("mywork",),
    ),
    CliCase(
        "model-routers-no-tokenizer",
        base("train-routers", model="m"),
        (copy_asset("moe", "m"), remove("m/tokenizer.json"), remove("m/tokenizer_config.json")),
        expect=("tokenizer",),
    ),
    CliCase(
        "model-evaluate-dense-missing",
        base("evaluate", "--tasks", "perplexity,agreement", "--dense", "gone"),
        expect=("gone",),
    ),
)


# ----------------------------------------------------------------------------- texts

TEXTS = (
    # "" would mean the working folder, and every text file in it
    CliCase(
        "data-profile-empty-name",
        base("profile", data=""),
        (user_file("texts/doc.txt", "the market and the bank " * 2000),),
        expect=("--data", "empty"),
    ),
    CliCase("data-evaluate-missing", base("evaluate", data="missing.txt"), expect=("missing.txt",)),
    CliCase(
        "data-sparsify-empty-file",
        base("sparsify", data="empty.txt"),
        (user_file("empty.txt", ""),),
        expect=("empty.txt",),
    ),
    CliCase(
        "data-layers-binary",
        base("layers", data="blob.txt"),
        (garbage("blob.txt"),),
        expect=("blob.txt",),
    ),
    CliCase(
        "data-drop-latin1",
        base("drop", data="latin1.txt"),
        (user_file("latin1.txt", "caf\xe9 cr\xe8me ".encode("latin-1") * 500),),
        expect=("latin1.txt",),
    ),
    CliCase(
        "data-finetune-too-short",
        base("finetune", data="short.txt"),
        (user_file("short.txt", "the market"),),
        expect=("short.txt",),
    ),
    CliCase(
        "data-splits-deeply-nested",
        base("splits", data="deep.jsonl"),
        (user_file("deep.jsonl", nested_json() + "\n"),),
        expect=("deep.jsonl",),
    ),
    CliCase(
        "data-evaluate-jsonl-no-text",
        base("evaluate", data="notext.jsonl"),
        (user_file("notext.jsonl", '{"content": "the market"}\n' * 50),),
        expect=("notext.jsonl",),
    ),
    CliCase(
        "data-sweep-jsonl-text-number",
        base("sweep", data="num.jsonl"),
        (user_file("num.jsonl", '{"text": 5}\n' * 50),),
        expect=("num.jsonl",),
    ),
    CliCase(
        "data-profile-empty-folder",
        base("profile", data="texts"),
        (lambda scratch, assets: (scratch / "texts").mkdir(),),
        expect=("texts",),
    ),
    CliCase(
        "data-routers-folder-without-text",
        base("train-routers", data="texts"),
        (user_file("texts/table.csv", "a,b\n1,2\n"),),
        expect=("texts",),
    ),
    CliCase(
        "data-layers-csv",
        base("layers", data="table.csv"),
        (user_file("table.csv", "a,b\n1,2\n"),),
        expect=("table.csv",),
    ),
    CliCase(
        "data-evaluate-link-loop",
        base("evaluate", data="loop.txt"),
        (symlink("loop.txt", "loop.txt"),),
        expect=("loop.txt",),
    ),
    CliCase("data-profile-device", base("profile", data="/dev/zero"), expect=("/dev/zero",)),
    CliCase(
        "data-drop-whitespace",
        base("drop", data="blank.txt"),
        (user_file("blank.txt", " \n\t\n" * 100),),
        expect=("blank.txt",),
    ),
    CliCase(
        "data-finetune-jsonl-nulls",
        base("finetune", data="nulls.jsonl"),
        (user_file("nulls.jsonl", "null\n" * 50),),
        expect=("nulls.jsonl",),
    ),
    CliCase(
        "data-profile-jsonl-not-json",
        base("profile", data="plain.jsonl"),
        (user_file("plain.jsonl", "the market\n" * 50),),
        expect=("plain.jsonl",),
    ),
    CliCase(
        "data-evaluate-folder-non-utf8",
        base("evaluate", data="texts"),
        (
            user_file("texts/a.txt", "the market " * 500),
            user_file("texts/b.txt", b"\xff\xfe bad bytes " * 100),
        ),
        expect=("b.txt",),
    ),
)


# ----------------------------------------------------------------------------- moefy folders

MOE = "{moe}"


def _moefied(*edits: Setup, name: str = "moe") -> tuple[Setup, ...]:
    return (copy_asset("moe", name), *edits)


def _moe_config(edit: Callable[[Any], Any]) -> Setup:
    return edit_json("moe/moefy_config.json", edit)


MOEFY_FOLDERS = (
    CliCase(
        "moefied-evaluate-1000-experts",
        base("evaluate", model="moe"),
        _moefied(_moe_config(every_layer(num_experts=1000))),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-generate-1e12-experts",
        base("generate", model="moe"),
        _moefied(_moe_config(every_layer(num_experts=10**12))),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-routers-negative-experts",
        base("train-routers", model="moe"),
        _moefied(_moe_config(every_layer(num_experts=-4))),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-evaluate-negative-expert-size",
        base("evaluate", model="moe"),
        _moefied(_moe_config(every_layer(expert_size=-16))),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-evaluate-dtype-int8",
        base("evaluate", model="moe"),
        _moefied(_moe_config(set_keys(dtype="int8"))),
        expect=("int8",),
    ),
    CliCase(
        "moefied-generate-dtype-number",
        base("generate", model="moe"),
        _moefied(_moe_config(set_keys(dtype=5))),
        expect=("dtype",),
    ),
    CliCase(
        "moefied-evaluate-layers-string",
        base("evaluate", model="moe"),
        _moefied(_moe_config(set_keys(layers="abc"))),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-evaluate-layers-empty",
        base("evaluate", model="moe"),
        _moefied(_moe_config(set_keys(layers=[]))),
        expect=("moe/", "layers"),
    ),
    CliCase(
        "moefied-routers-layer-not-object",
        base("train-routers", model="moe"),
        _moefied(_moe_config(set_keys(layers=[7, 7]))),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-evaluate-experts-string",
        base("evaluate", model="moe"),
        _moefied(_moe_config(every_layer(num_experts="four"))),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-evaluate-experts-float",
        base("evaluate", model="moe"),
        _moefied(_moe_config(every_layer(num_experts=4.5))),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-evaluate-experts-bool",
        base("evaluate", model="moe"),
        _moefied(_moe_config(every_layer(num_experts=True))),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-evaluate-selector-string",
        base("evaluate", model="moe"),
        _moefied(_moe_config(every_layer(selector="oracle"))),
        expect=("moefy_config.json", "selector"),
    ),
    CliCase(
        "moefied-evaluate-layer-index-99",
        base("evaluate", model="moe"),
        _moefied(_moe_config(lambda r: r["layers"][0].update(index=99))),
        expect=("99",),
    ),
    CliCase(
        "moefied-evaluate-version-2",
        base("evaluate", model="moe"),
        _moefied(_moe_config(set_keys(version=2))),
        expect=("version",),
    ),
    CliCase(
        "moefied-evaluate-format-other",
        base("evaluate", model="moe"),
        _moefied(_moe_config(set_keys(format="something-else"))),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-generate-config-bad-json",
        base("generate", model="moe"),
        _moefied(user_file("moe/moefy_config.json", '{"format": "moefy-moe",')),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-evaluate-config-list",
        base("evaluate", model="moe"),
        _moefied(user_file("moe/moefy_config.json", "[]")),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-evaluate-config-deeply-nested",
        base("evaluate", model="moe"),
        _moefied(user_file("moe/moefy_config.json", nested_json())),
        expect=("moefy_config.json",),
    ),
    CliCase(
        "moefied-evaluate-model-class-not-a-model",
        base("evaluate", model="moe"),
        _moefied(_moe_config(set_keys(model_class="AutoConfig"))),
        expect=("AutoConfig",),
    ),
    CliCase(
        "moefied-evaluate-moefy-config-bad",
        base("evaluate", model="moe"),
        _moefied(_moe_config(lambda r: r["moefy_config"].update(num_experts=-1))),
        expect=("moefy_config.json", "num_experts"),
    ),
    CliCase(
        "moefied-evaluate-wrong-counts-every-layer",
        base("evaluate", model="moe"),
        _moefied(_moe_config(every_layer(num_experts=8, expert_size=8))),
        expect=("model.safetensors", "moefy_config.json"),
    ),
    CliCase(
        "moefied-evaluate-no-weights",
        base("evaluate", model="moe"),
        _moefied(remove("moe/model.safetensors")),
        expect=("model.safetensors",),
    ),
    CliCase(
        "moefied-evaluate-no-config",
        base("evaluate", model="moe"),
        _moefied(remove("moe/config.json")),
        expect=("config.json",),
    ),
    CliCase(
        "moefied-routers-truncated-weights",
        base("train-routers", model="moe"),
        _moefied(truncate("moe/model.safetensors")),
        expect=("model.safetensors",),
    ),
    CliCase(
        "moefied-evaluate-nan-weights",
        base("evaluate", model="moe"),
        _moefied(poison_weights("moe", float("nan"))),
        expect=("model.safetensors", "nan"),
    ),
    CliCase(
        "sparse-evaluate-marker-bad-json",
        base("evaluate", model="sp"),
        (copy_asset("sparse", "sp"), user_file("sp/moefy_sparsify.json", "{")),
        expect=("moefy_sparsify.json",),
    ),
    CliCase(
        "sparse-evaluate-unknown-method",
        base("evaluate", model="sp"),
        (
            copy_asset("sparse", "sp"),
            edit_json(
                "sp/moefy_sparsify.json", lambda m: m["sparsify_config"].update(method="psychic")
            ),
        ),
        expect=("psychic",),
    ),
    CliCase(
        "sparse-evaluate-sparsity-5",
        base("evaluate", model="sp"),
        (
            copy_asset("sparse", "sp"),
            edit_json("sp/moefy_sparsify.json", lambda m: m["sparsify_config"].update(sparsity=5)),
        ),
        expect=("sparsity",),
    ),
    CliCase(
        "sparse-generate-wrapped-unknown",
        base("generate", model="sp"),
        (
            copy_asset("sparse", "sp"),
            edit_json("sp/moefy_sparsify.json", set_keys(wrapped=["model.nowhere.down_proj"])),
        ),
        expect=("moefy_sparsify.json", "model.nowhere", "sp:"),
    ),
    CliCase(
        "dropped-evaluate-block-99",
        base("evaluate", model="dr"),
        (
            copy_asset("dropped", "dr"),
            edit_json("dr/moefy_layers.json", lambda m: m["dropped"].update(blocks=[99])),
        ),
        expect=("99",),
    ),
    CliCase(
        "dropped-evaluate-blocks-string",
        base("evaluate", model="dr"),
        (
            copy_asset("dropped", "dr"),
            edit_json("dr/moefy_layers.json", lambda m: m["dropped"].update(blocks="all")),
        ),
        expect=("moefy_layers.json", "blocks"),
    ),
    CliCase(
        "dropped-evaluate-format-version-99",
        base("evaluate", model="dr"),
        (
            copy_asset("dropped", "dr"),
            edit_json("dr/moefy_layers.json", set_keys(format_version=99)),
        ),
        expect=("version",),
    ),
)


# ----------------------------------------------------------------------------- profiles

PROFILES = (
    CliCase(
        "profile-convert-missing",
        (*base("convert"), "--method", "coactivation", "--profile", "gone"),
        expect=("gone",),
    ),
    CliCase(
        "profile-convert-summary-bad-json",
        (*base("convert"), "--method", "coactivation", "--profile", "prof"),
        (copy_asset("profile", "prof"), user_file("prof/summary.json", "{")),
        expect=("summary.json",),
    ),
    CliCase(
        "profile-convert-arrays-truncated",
        (*base("convert"), "--method", "coactivation", "--profile", "prof"),
        (copy_asset("profile", "prof"), truncate("prof/arrays.safetensors")),
        expect=("arrays.safetensors",),
    ),
    CliCase(
        "profile-convert-no-coactivation",
        (*base("convert"), "--method", "coactivation", "--profile", "prof"),
        (copy_asset("profile", "prof"), remove("prof/coactivation.safetensors")),
        expect=("coactivation",),
    ),
    CliCase(
        "profile-convert-is-a-file",
        (*base("convert"), "--method", "coactivation", "--profile", "notes.txt"),
        (user_file("notes.txt"),),
        expect=("notes.txt",),
    ),
    CliCase(
        "profile-splits-summary-wrong-types",
        (*base("splits"), "--methods", "coactivation", "--profile", "prof"),
        (
            copy_asset("profile", "prof"),
            edit_json("prof/summary.json", set_keys(layers="many", fingerprint=[1])),
        ),
        expect=("summary.json", "prof"),
    ),
    CliCase(
        "profile-report-missing",
        base("report", "--out", "r.html", "--profile", "gone"),
        expect=("gone",),
    ),
    CliCase(
        "profile-sweep-user-folder",
        base("sweep", "--profile", "mywork"),
        (user_folder("mywork"),),
        expect=("mywork",),
    ),
)


# ----------------------------------------------------------------------------- reports


def _sweep_copy() -> Setup:
    return copy_asset("sweep", "sw")


def _rows(text: str | bytes) -> tuple[Setup, ...]:
    return (_sweep_copy(), user_file("sw/rows.json", text))


REPORTS = (
    CliCase("report-missing-folder", ("report", "gone"), expect=("gone",)),
    CliCase(
        "report-user-folder", ("report", "mywork"), (user_folder("mywork"),), expect=("rows.json",)
    ),
    CliCase(
        "report-sweep-is-a-file",
        ("report", "notes.txt"),
        (user_file("notes.txt"),),
        expect=("notes.txt",),
    ),
    CliCase("report-rows-object", ("report", "sw"), _rows("{}"), expect=("rows.json",)),
    CliCase("report-rows-strings", ("report", "sw"), _rows('["a", "b"]'), expect=("rows.json",)),
    CliCase(
        "report-rows-wrong-types",
        ("report", "sw"),
        _rows('[{"method": 5, "level": "high", "perplexity": "x", "family": []}]'),
        expect=("rows.json",),
    ),
    CliCase(
        "report-rows-level-string",
        ("report", "sw"),
        _rows('[{"method": "topk", "family": "threshold", "level": "half", "perplexity": 3.0}]'),
        expect=("rows.json", "level"),
    ),
    CliCase(
        "report-rows-perplexity-object",
        ("report", "sw"),
        _rows('[{"method": "dense", "family": "dense", "level": null, "perplexity": {"x": 1}}]'),
        expect=("rows.json", "perplexity"),
    ),
    CliCase(
        "report-rows-no-method", ("report", "sw"), _rows('[{"level": 0.5}]'), expect=("rows.json",)
    ),
    CliCase(
        "report-rows-folder",
        ("report", "sw"),
        (_sweep_copy(), remove("sw/rows.json"), user_folder("sw/rows.json")),
        expect=("rows.json",),
    ),
    CliCase("report-rows-empty", ("report", "sw"), _rows(""), expect=("rows.json",)),
    CliCase(
        "report-rows-non-utf8",
        ("report", "sw"),
        _rows(b'[{"method": "\xff"}]'),
        expect=("rows.json",),
    ),
    CliCase(
        "report-rows-deeply-nested", ("report", "sw"), _rows(nested_json()), expect=("rows.json",)
    ),
)


# ----------------------------------------------------------------------------- sweeps

SWEEPS = (
    CliCase(
        "sweep-moe-missing",
        base("sweep", "--methods", "dense,moe-oracle", "--moe", "gone"),
        expect=("gone",),
    ),
    CliCase(
        "sweep-moe-dense-folder",
        base("sweep", "--methods", "dense,moe-oracle", "--moe", "{tiny}"),
        expect=("convert",),
    ),
    CliCase(
        "sweep-carved-missing",
        base("sweep", "--methods", "dense,moe-carved", "--carved", "gone"),
        expect=("gone",),
    ),
    CliCase(
        "sweep-carved-dense-folder",
        base("sweep", "--methods", "dense,moe-carved", "--carved", "{tiny}"),
        expect=("--carved",),
    ),
    CliCase(
        "sweep-resume-rows-folder",
        base("sweep", "--out", "sw"),
        (_sweep_copy(), remove("sw/rows.json"), user_folder("sw/rows.json")),
        expect=("rows.json",),
    ),
    CliCase(
        "sweep-level-drop-too-many",
        base(
            "sweep", "--methods", "dense,drop-attn", "--level", "drop-attn=99", drop=("--levels",)
        ),
        expect=("99", "drop-attn"),
    ),
)


# ----------------------------------------------------------------------------- checkpoints


def _ft_copy() -> Setup:
    return copy_asset("ft", "ft")


_STATE = "ft/checkpoint/state.pt"

CHECKPOINTS = (
    CliCase(
        "ckpt-finetune-pickle-runs-code",
        base("finetune", "--out", "ft"),
        (_ft_copy(), remove(_STATE), crafted_pickle(_STATE, lambda p: {"config": p})),
        expect=("state.pt",),
    ),
    CliCase(
        "ckpt-finetune-garbage",
        base("finetune", "--out", "ft"),
        (_ft_copy(), garbage(_STATE)),
        expect=("state.pt",),
    ),
    CliCase(
        "ckpt-finetune-truncated",
        base("finetune", "--out", "ft"),
        (_ft_copy(), truncate(_STATE)),
        expect=("state.pt",),
    ),
    CliCase(
        "ckpt-finetune-a-list",
        base("finetune", "--out", "ft"),
        (_ft_copy(), torch_file(_STATE, [1, 2, 3])),
        expect=("state.pt",),
    ),
    CliCase(
        "ckpt-finetune-missing-keys",
        base("finetune", "--out", "ft"),
        (_ft_copy(), torch_file(_STATE, {"config": {}, "steps": 1})),
        expect=("state.pt",),
    ),
    CliCase(
        "ckpt-finetune-other-settings",
        base("finetune", "--out", "ft", "--lr", "0.5"),
        (_ft_copy(),),
        expect=("state.pt", "settings"),
    ),
    CliCase(
        "ckpt-finetune-state-is-folder",
        base("finetune", "--out", "ft"),
        (_ft_copy(), remove(_STATE), user_folder(_STATE)),
        expect=("state.pt",),
    ),
)


# ----------------------------------------------------------------------------- concurrency

LOCKS = (
    CliCase(
        "lock-convert-second-writer",
        base("convert", "--out", "new"),
        (another_writer("new"),),
        expect=("another moefy run", "--out"),
        early=True,
    ),
    CliCase(
        "lock-evaluate-second-writer",
        base("evaluate", "--out", "new.json"),
        (another_writer("new.json"),),
        expect=("another moefy run", "--out"),
        early=True,
    ),
    CliCase(
        "lock-sweep-second-writer",
        base("sweep", "--out", "new"),
        (another_writer("new"),),
        expect=("another moefy run", "--out"),
        early=True,
    ),
)


CLI_CASES: list[CliCase] = [
    *output_cases(),
    *number_cases(),
    *CHOICES,
    *MODELS,
    *TEXTS,
    *MOEFY_FOLDERS,
    *PROFILES,
    *REPORTS,
    *SWEEPS,
    *CHECKPOINTS,
    *LOCKS,
]
