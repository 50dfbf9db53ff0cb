"""The files of a saved :class:`moefy.profiling.SparsityProfile` folder, written atomically and
read back with one-line errors; this module knows the files, the profile class knows the numbers.

Folder layout:
    summary.json              version, config, model fingerprint, data, per-layer summaries
    arrays.safetensors        the float64 accumulator sums, keys ``layer.{i}.{name}``
    coactivation.safetensors  only with ``coactivation=True``: (F, F) float64 per layer,
                              keys ``layer.{i}``; read one layer at a time, never at load
    patterns.safetensors      only with ``pattern_tokens > 0``: (F, S) float16 activation
                              patterns per layer, keys ``layer.{i}``, scaled as
                              :func:`moefy.profiling.patterns.encode_patterns` says; shapes are
                              checked at load, values read one layer at a time

A folder written before activation rates existed (version 1) has no ``top_counts`` /
``contribution_share`` sums and no patterns; it loads, and the profile says what is missing when
asked for them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from moefy.errors import MoefyError
from moefy.io import FOLDER, atomic_path
from moefy.jsonconfig import loads_json
from moefy.profiling.config import ProfileConfig

PROFILE_VERSION = 2  # 2: activation rates (top_counts, contribution_share) and patterns
PROFILE_FORMAT = "moefy.sparsity_profile"
SUMMARY_FILE = "summary.json"
ARRAYS_FILE = "arrays.safetensors"
COACTIVATION_FILE = "coactivation.safetensors"
PATTERNS_FILE = "patterns.safetensors"
# the arrays every layer's sums must hold
_EXPECTED_SUMS = {"tokens", "firing_counts", "active_count_histogram", "abs_histogram"}
# the (F,) sums behind the activation rates: every layer has both, or (an older folder) none
RATE_SUMS = ("top_counts", "contribution_share")


@dataclass
class StoredProfile:
    """What a profile folder holds, before the profile is rebuilt from it."""

    config: ProfileConfig
    fingerprint: dict[str, Any]
    layer_names: list[str]
    layer_sums: list[dict[str, torch.Tensor]]
    data: dict[str, Any] | None
    coactivation_file: Path | None
    patterns_file: Path | None = None


def write_profile(
    path: Path,
    summary: dict[str, Any],
    layer_sums: list[dict[str, torch.Tensor]],
    *,
    coactivation: list[torch.Tensor] | None,
    coactivation_file: Path | None,
    overwrite: bool,
    patterns: list[torch.Tensor] | None = None,
    patterns_file: Path | None = None,
) -> None:
    """Write a profile folder atomically: the summary, the sums, the co-activation counts and the
    activation patterns (each from memory, or copied from the file they were loaded from).

    Args:
        path: the output folder.
        summary: the content of ``summary.json``.
        layer_sums: the float64 accumulator sums of each layer.
        coactivation: (F, F) counts per layer in memory, or None.
        coactivation_file: the file holding the counts when they are not in memory, or None.
        overwrite: replace ``path`` if moefy wrote it before.
        patterns: (F, S) float16 activation patterns per layer in memory, already encoded by
            :func:`moefy.profiling.patterns.encode_patterns`, or None.
        patterns_file: the file holding the patterns when they are not in memory, or None.
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
        if patterns is not None:
            save_file(
                {f"layer.{i}": p.contiguous() for i, p in enumerate(patterns)},
                str(tmp / PATTERNS_FILE),
                metadata={"format": PROFILE_FORMAT},
            )
        elif patterns_file is not None:
            shutil.copyfile(patterns_file, tmp / PATTERNS_FILE)
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
        has_patterns = bool(summary.get("has_patterns", False))  # absent before version 2
    except (KeyError, TypeError) as err:
        raise MoefyError(f"{summary_file} is incomplete (missing {err}); profile again") from None
    layer_sums = _read_sums(path / ARRAYS_FILE, len(names))
    coactivation_file = path / COACTIVATION_FILE if has_coactivation else None
    if coactivation_file is not None and not coactivation_file.is_file():
        raise MoefyError(f"{coactivation_file} is missing although {summary_file} lists it")
    patterns_file = path / PATTERNS_FILE if has_patterns else None
    if patterns_file is not None:
        _check_patterns(patterns_file, layer_sums)
    return StoredProfile(
        config,
        fingerprint,
        names,
        layer_sums,
        summary.get("data"),
        coactivation_file,
        patterns_file,
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
    _check_rate_sums(arrays_file, layer_sums)
    return layer_sums


def _check_rate_sums(arrays_file: Path, layer_sums: list[dict[str, torch.Tensor]]) -> None:
    """Every layer has both (F,) rate sums, shaped like its firing counts, or no layer has any."""
    has_rates = {name in sums for sums in layer_sums for name in RATE_SUMS}
    if len(has_rates) > 1:
        raise MoefyError(
            f"{arrays_file} holds activation rates for some layers only; profile again"
        )
    for i, sums in enumerate(layer_sums):
        shape = sums["firing_counts"].shape
        for name in RATE_SUMS:
            if name in sums and sums[name].shape != shape:
                raise MoefyError(
                    f"{arrays_file}: {name} of layer {i} has shape {tuple(sums[name].shape)}, "
                    f"expected {tuple(shape)}; profile again"
                )


def _check_patterns(patterns_file: Path, layer_sums: list[dict[str, torch.Tensor]]) -> None:
    """The patterns file holds one (F, S) float16 array per layer, the same S > 0 for all,
    next to activation rates (headers only: the values stay on disk)."""
    if not layer_sums or RATE_SUMS[0] not in layer_sums[0]:
        raise MoefyError(f"{patterns_file} comes without activation rates; profile again")
    try:
        with safe_open(str(patterns_file), framework="pt") as file:
            keys = set(file.keys())
            found = {
                key: (file.get_slice(key).get_shape(), file.get_slice(key).get_dtype())
                for key in keys
            }
    except (OSError, SafetensorError) as err:
        raise MoefyError(f"{patterns_file} is missing or corrupt ({err}); profile again") from None
    expected = {f"layer.{i}" for i in range(len(layer_sums))}
    if keys != expected:
        raise MoefyError(
            f"{patterns_file} holds {len(keys)} arrays, expected one per layer "
            f"({len(expected)}); profile again"
        )
    widths = set()
    for i, sums in enumerate(layer_sums):
        shape, dtype = found[f"layer.{i}"]
        F = sums["firing_counts"].numel()
        if dtype != "F16" or len(shape) != 2 or shape[0] != F or shape[1] < 1:
            raise MoefyError(
                f"{patterns_file}: layer {i} holds a {dtype} array of shape {tuple(shape)}, "
                f"expected float16 ({F}, tokens); profile again"
            )
        widths.add(shape[1])
    if len(widths) > 1:
        raise MoefyError(f"{patterns_file}: the layers sample different tokens; profile again")
