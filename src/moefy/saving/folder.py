"""One saved format for every model moefy changed: write it, recognise it, load it back.

A folder holds the Hugging Face config, one ``model.safetensors`` with the changed model's whole
state dict, one record per change (written by the change's :class:`ChangeFormat`) and the
manifest: moefy's output marker :data:`MANIFEST_FILE` (``moefy_output.json``, which every folder
moefy writes carries) with ``{"format": "moefy-model", "version": 1, "changes": [...]}``, the
changes in the order they are replayed. Loading builds the base model from its config on
the meta device, replays each change's structure, checks it against the safetensors header,
then assigns the saved tensors.

Folders of the previous release have no manifest and one record file: they are read as a
manifest listing that one change. A marker without ``format`` (a profile's, a sweep's) is no
manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from moefy.errors import MoefyError
from moefy.io import OUTPUT_MARKER
from moefy.jsonconfig import loads_json
from moefy.models.marked import WEIGHTS_FILE, build_model, load_weights, write_marked_folder
from moefy.models.weights import safetensors_header
from moefy.saving.changes import SAVED_FORMATS, ChangeFormat, ordered_formats

FORMAT_NAME = "moefy-model"
FORMAT_VERSION = 1
MANIFEST_FILE = OUTPUT_MARKER


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write any model moefy changed (relufied, moefied, routed, sparsified, layers dropped,
    alone or combined) to the folder ``path`` atomically.

    Args:
        model: a Hugging Face model changed by moefy's verbs.
        path: the output folder.
        tokenizer: optional tokenizer to save alongside.
        overwrite: replace ``path`` if moefy wrote it before (see :mod:`moefy.io`; a folder
            moefy did not write is never replaced).
        extra_json: optional ``file name -> JSON-able object`` written in the same atomic step.

    Returns:
        The folder path.

    Raises:
        MoefyError: the model carries no change moefy made, has no Hugging Face config, or
            ``path`` is refused.

    Example:
        >>> relufy_(model); moefy_(model, MoEfyConfig(num_experts=8))
        >>> save(model, "runs/relu-moe", tokenizer=tokenizer)
        >>> same, tokenizer = moefy.load("runs/relu-moe")
    """
    captured = [(f, record) for f in ordered_formats() if (record := f.capture(model)) is not None]
    if not captured:
        raise MoefyError(
            "the model carries no change moefy made (relufy_, moefy_, sparsify_, drop_layers_): "
            "save it with save_pretrained"
        )
    from moefy import __version__

    manifest = {
        "writer": "moefy",
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "moefy_version": __version__,
        "changes": [change.name for change, _ in captured],
    }
    records = {change.file: record for change, record in captured} | {MANIFEST_FILE: manifest}
    return write_marked_folder(
        model, path, records, tokenizer=tokenizer, extra_json=extra_json, overwrite=overwrite
    )


def save_carrying(
    change: str, model: nn.Module, path: str | os.PathLike, *, absent: str, **options: Any
) -> Path:
    """:func:`save` for a model that must carry one change (the savers of one change).

    Args:
        change: the registered format's name (``"moefy-sparsify"``).
        model: the model to write.
        path: the output folder.
        absent: the error when the model does not carry ``change``.
        **options: ``tokenizer``, ``extra_json`` and ``overwrite``, as for :func:`save`.

    Returns:
        The folder path.

    Raises:
        MoefyError: ``absent``, or what :func:`save` raises.

    Example:
        >>> save_carrying("moefy-layers", model, "runs/drop", absent="nothing is dropped")
    """
    if SAVED_FORMATS.get(change).value.capture(model) is None:
        raise MoefyError(absent)
    return save(model, path, **options)


def load_carrying(change: str, path: str | os.PathLike, *, writer: str) -> nn.Module:
    """:func:`load_folder` for a folder that must record one change (the loaders of one change).

    Args:
        change: the registered format's name (``"moefy-sparsify"``).
        path: the folder.
        writer: the function that writes such folders, named when ``path`` is no folder.

    Returns:
        The model, in eval mode.

    Raises:
        MoefyError: no such folder, or what :func:`load_folder` raises.

    Example:
        >>> model = load_carrying("moefy-layers", "runs/drop", writer="save_dropped")
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MoefyError(f"no such folder: {folder}; give a folder written by {writer}")
    return load_folder(folder, require=change)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when its marker is missing, unreadable or no manifest."""
    try:
        manifest = loads_json((folder / MANIFEST_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    return manifest if isinstance(manifest, dict) and "format" in manifest else None


def saved_changes(folder: Path) -> list[ChangeFormat]:
    """The changes a folder records, in replay order: its manifest's, or the one record file of
    a folder the previous release wrote; ``[]`` for any other folder."""
    manifest = _read_manifest(folder)
    where = folder / MANIFEST_FILE
    if manifest is None:
        found = [f for f in ordered_formats() if (folder / f.file).is_file()]
        if len(found) > 1:
            raise MoefyError(
                f"{folder} holds {len(found)} change records but {where} does not list them: "
                "save the model again"
            )
        return found
    if manifest.get("format") != FORMAT_NAME:
        raise MoefyError(f"{where} is not a {FORMAT_NAME} manifest: save the model again")
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MoefyError(f"{where} has version {version!r}: save the model again")
    if version > FORMAT_VERSION:
        raise MoefyError(
            f"{where} has version {version}; this moefy reads up to {FORMAT_VERSION}: upgrade moefy"
        )
    names = manifest.get("changes")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise MoefyError(f"{where} lists no changes: save the model again")
    if len(set(names)) != len(names):
        raise MoefyError(f"{where} lists a change twice: save the model again")
    changes = [SAVED_FORMATS.get(name).value for name in names]  # unknown: one line
    return sorted(changes, key=lambda change: change.rank)


def is_saved_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a model saved by :func:`save` (or by the previous release)."""
    folder = Path(folder)
    return _read_manifest(folder) is not None or any(
        (folder / f.file).is_file() for f in ordered_formats()
    )


def load_folder(path: str | os.PathLike, *, require: str | None = None) -> nn.Module:
    """Load a folder written by :func:`save`: the same structure, weights and outputs.

    Args:
        path: the folder.
        require: the name of a format the folder must record (``"moefy-moe"``), for the
            loaders of one change (:func:`moefy.moe.from_pretrained`).

    Returns:
        The model, in eval mode, in the dtype it was saved in.

    Raises:
        MoefyError: a missing, corrupt or mismatched folder (manifest, records, config and
            weights that do not fit together), one line naming the file.

    Example:
        >>> model = load_folder("runs/relu-moe")
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MoefyError(f"{folder}: no such folder; give a folder written by moefy.save")
    changes = saved_changes(folder)
    required = SAVED_FORMATS.get(require).value if require is not None else None
    if required is not None and required not in changes:
        raise MoefyError(f"{folder} has no {required.file}: {required.missing_hint}")
    if not changes:
        raise MoefyError(f"{folder} holds no model moefy saved: save one with moefy.save")
    records = [(change, change.read(folder)) for change in changes]
    first, first_record = records[0]
    for change, record in records[1:]:
        if (record["model_class"], record.get("dtype")) != (
            first_record["model_class"],
            first_record.get("dtype"),
        ):
            raise MoefyError(
                f"{folder / change.file} records another model class or dtype than "
                f"{first.file}: the files do not belong together; save the model again"
            )
    header = safetensors_header(folder / WEIGHTS_FILE)  # a corrupt file fails before any build
    model, dtype = build_model(folder, first_record, first.file)
    replayed = [change.replay(model, record, header, folder) for change, record in records]
    load_weights(model, folder)
    for (change, record), state in zip(records, replayed, strict=True):
        change.finish(model, record, state)
    return model.to(dtype).eval()


def adopt_plain(model: nn.Module) -> None:
    """Apply what a plain Hugging Face folder's config records of moefy's changes (a FATReLU
    threshold) to a model loaded from it."""
    for change in ordered_formats():
        change.adopt(model)
