"""The files of a saved :class:`moefy.profiling.SparsityProfile` folder, written atomically and
read back with one-line errors; this module knows the files, the profile class knows the numbers.

Folder layout:
    summary.json              version, config, model fingerprint, data, per-layer summaries
    arrays.safetensors        the float64 accumulator sums, keys ``layer.{i}.{name}``
    coactivation.safetensors  only with ``coactivation=True``: (F, F) float64 per layer,
                              keys ``layer.{i}``; read one layer at a time, never at load
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moefy.errors import MoefyError
from moefy.io import FOLDER, atomic_path
from moefy.jsonconfig import loads_json
from moefy.profiling.config import ProfileConfig

PROFILE_VERSION = 1
PROFILE_FORMAT = "moefy.sparsity_profile"
SUMMARY_FILE = "summary.json"
ARRAYS_FILE = "arrays.safetensors"
COACTIVATION_FILE = "coactivation.safetensors"
# the arrays every layer's sums must hold
_EXPECTED_SUMS = {"tokens", "firing_counts", "active_count_histogram", "abs_histogram"}


@dataclass
class StoredProfile:
    """What a profile folder holds, before the profile is rebuilt from it."""

    config: ProfileConfig
    fingerprint: dict[str, Any]
    layer_names: list[str]
    layer_sums: list[dict[str, torch.Tensor]]
    data: dict[str, Any] | None
    coactivation_file: Path | None


def write_profile(
    path: Path,
    summary: dict[str, Any],
    layer_sums: list[dict[str, torch.Tensor]],
    *,
    coactivation: list[torch.Tensor] | None,
    coactivation_file: Path | None,
    overwrite: bool,
) -> None:
    """Write a profile folder atomically: the summary, the sums, and the co-activation counts
    (from memory, or copied from the file they were loaded from).

    Args:
        path: the output folder.
        summary: the content of ``summary.json``.
        layer_sums: the float64 accumulator sums of each layer.
        coactivation: (F, F) counts per layer in memory, or None.
        coactivation_file: the file holding the counts when they are not in memory, or None.
        overwrite: replace ``path`` if moefy wrote it before.
    """
    with atomic_path(path, FOLDER, overwrite=overwrite) as tmp:
        tmp.mkdir()
        arrays = {
            f"layer.{i}.{name}": tensor.contiguous()
            for i, sums in enumerate(layer_sums)
            for name, tensor in sums.items()
        }
        save_file(arrays, str(tmp / ARRAYS_FILE), metadata={"format": PROFILE_FORMAT})
        if coactivation is not None:
            save_file(
                {f"layer.{i}": c.contiguous() for i, c in enumerate(coactivation)},
                str(tmp / COACTIVATION_FILE),
            )
        elif coactivation_file is not None:
            shutil.copyfile(coactivation_file, tmp / COACTIVATION_FILE)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def read_profile(path: str | os.PathLike) -> StoredProfile:
    """Read a profile folder written by :func:`write_profile`.

    Raises:
        MoefyError: the folder is missing, incomplete or corrupt, or was written by a newer
            moefy.
    """
    path = Path(path)
    summary_file = path / SUMMARY_FILE
    summary = _read_summary(path, summary_file)
    try:
        config = ProfileConfig.from_dict(summary["config"])
        names = [layer["name"] for layer in summary["layers"]]
        fingerprint = dict(summary["fingerprint"])
        has_coactivation = bool(summary["has_coactivation"])
    except (KeyError, TypeError) as err:
        raise MoefyError(f"{summary_file} is incomplete (missing {err}); profile again") from None
    layer_sums = _read_sums(path / ARRAYS_FILE, len(names))
    coactivation_file = path / COACTIVATION_FILE if has_coactivation else None
    if coactivation_file is not None and not coactivation_file.is_file():
        raise MoefyError(f"{coactivation_file} is missing although {summary_file} lists it")
    return StoredProfile(
        config, fingerprint, names, layer_sums, summary.get("data"), coactivation_file
    )


def _read_summary(path: Path, summary_file: Path) -> dict[str, Any]:
    if not summary_file.is_file():
        raise MoefyError(
            f"no sparsity profile at {path}: expected a folder with {SUMMARY_FILE} and "
            f"{ARRAYS_FILE}, written by 'moefy profile' or SparsityProfile.save"
        )
    try:
        summary = loads_json(summary_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoefyError(f"{summary_file} is corrupt ({err}); profile the model again") from None
    if not isinstance(summary, dict) or summary.get("format") != PROFILE_FORMAT:
        raise MoefyError(f"{summary_file} is not a moefy sparsity profile")
    version = summary.get("version")
    if not isinstance(version, int) or version > PROFILE_VERSION:
        raise MoefyError(
            f"{path} was written by a newer moefy (profile version {version}; this moefy reads "
            f"up to {PROFILE_VERSION}): upgrade moefy"
        )
    return summary


def _read_sums(arrays_file: Path, num_layers: int) -> list[dict[str, torch.Tensor]]:
    try:
        arrays = load_file(str(arrays_file))
    except (OSError, SafetensorError) as err:
        raise MoefyError(f"{arrays_file} is missing or corrupt ({err}); profile again") from None
    layer_sums: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
    for key, tensor in arrays.items():
        _, index, name = key.split(".", 2)
        if not index.isdigit() or int(index) >= num_layers:
            raise MoefyError(f"{arrays_file} holds an unexpected array {key!r}")
        layer_sums[int(index)][name] = tensor
    for i, sums in enumerate(layer_sums):
        if not set(sums) >= _EXPECTED_SUMS:
            raise MoefyError(f"{arrays_file} lacks the arrays of layer {i}; profile again")
    return layer_sums
