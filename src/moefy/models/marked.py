"""Marked model folders: a Hugging Face model saved with a versioned moefy marker file.

moefy's changed models (sparsified, layer-dropped) are saved as

- ``config.json`` (and ``generation_config.json``, tokenizer files): the Hugging Face model;
- ``model.safetensors``: the changed model's state dict (tied tensors stored once);
- a marker JSON (``moefy_sparsify.json``, ``moefy_layers.json``): format name and version, the
  moefy version, model class and dtype, plus what the change needs to be replayed.

Loading builds the plain model from its config, lets the caller replay the change (the
structure), then loads the state dict strictly (the numbers). This module holds the parts every
such format shares; each format module adds its own fields and replay.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from moefy.errors import MoefyError
from moefy.io import FOLDER, atomic_path, check_output
from moefy.jsonconfig import loads_json
from moefy.models.hf_config import HF_CONFIG_FILE, read_hf_config
from moefy.models.weights import float_dtype, load_safetensors, safetensors_header

WEIGHTS_FILE = "model.safetensors"


def base_marker(model: nn.Module, format_name: str, format_version: int) -> dict[str, Any]:
    """The marker fields every format shares: format, versions, model class and dtype."""
    from moefy import __version__

    return {
        "format": format_name,
        "format_version": format_version,
        "moefy_version": __version__,
        "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def write_marked_folder(
    model: nn.Module,
    path: str | os.PathLike,
    marker_file: str,
    marker: dict[str, Any],
    *,
    tokenizer: Any = None,
    extra_json: dict[str, Any] | None = None,
    set_architectures: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write config, generation config, tokenizer, extra JSON, weights and marker atomically.

    Args:
        model: a Hugging Face model (with ``config``).
        path: the folder (nothing half-written is left on failure).
        marker_file: the marker's file name.
        marker: the marker (see :func:`base_marker`).
        tokenizer: optional tokenizer to save alongside.
        extra_json: optional ``file name -> JSON-able object`` written in the same step.
        set_architectures: record the model's class in ``config.architectures``.
        overwrite: replace ``path`` if moefy wrote it before (a folder moefy did not write is
            never replaced; see :mod:`moefy.io`).

    Raises:
        MoefyError: the model has no Hugging Face config, or ``path`` is refused.
    """
    from safetensors.torch import save_model

    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "save_pretrained"):
        raise MoefyError(
            f"{type(model).__name__} has no Hugging Face config: save its state_dict yourself"
        )
    check_output(path, FOLDER, overwrite=overwrite, option="path")
    with atomic_path(path, FOLDER, overwrite=overwrite) as tmp:
        tmp.mkdir()
        hf_config = type(hf_config).from_dict(hf_config.to_dict())  # a copy we may edit
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config  # weights are saved dequantised
        if set_architectures:
            hf_config.architectures = [type(model).__name__]
        hf_config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        # save_model drops duplicates of tied tensors (tied embeddings); loading restores them.
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / marker_file).write_text(json.dumps(marker, indent=2) + "\n")
    return Path(path)


def read_marker(
    folder: Path,
    marker_file: str,
    format_name: str,
    format_version: int,
    required: tuple[str, ...],
    missing_hint: str,
) -> dict[str, Any]:
    """Read and check a folder's marker; one-line errors for missing, corrupt or newer ones.

    Args:
        folder: the model folder.
        marker_file: the marker's file name.
        format_name: the ``format`` the marker must have.
        format_version: the newest version this moefy reads.
        required: keys the marker must hold besides the shared ones.
        missing_hint: the end of the error when the folder has no marker (what wrote it).
    """
    marker_path = folder / marker_file
    if not marker_path.is_file():
        raise MoefyError(f"{folder} has no {marker_file}: {missing_hint}")
    try:
        marker = loads_json(marker_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoefyError(f"{marker_path} is corrupt ({err}): save the model again") from None
    if not isinstance(marker, dict) or marker.get("format") != format_name:
        raise MoefyError(f"{marker_path} is not a {format_name} marker: save the model again")
    version = marker.get("format_version")
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or not 1 <= version <= format_version
    ):
        raise MoefyError(
            f"{marker_path} has format version {version!r}; this moefy reads up to "
            f"{format_version}: upgrade moefy"
        )
    for key in ("model_class", *required):
        if key not in marker:
            raise MoefyError(f"{marker_path} lacks {key!r}: save the model again")
    if not isinstance(marker["model_class"], str):
        raise MoefyError(f"{marker_path} has no model class name: save the model again")
    float_dtype(marker.get("dtype", "float32"), marker_path)
    return marker


def build_model(folder: Path, marker: dict[str, Any], marker_file: str) -> tuple[nn.Module, Any]:
    """The plain model the marker names, built from the folder's config, in eval mode.

    Returns:
        ``(model, dtype)``: the model in float32 and the dtype to cast it to after loading.
    """
    import transformers

    model_class = getattr(transformers, str(marker["model_class"]), None)
    if not isinstance(model_class, type) or not issubclass(model_class, nn.Module):
        raise MoefyError(
            f"{folder / marker_file} names model class {marker['model_class']!r}, which this "
            "transformers does not have: upgrade transformers or save again"
        )
    dtype = float_dtype(marker.get("dtype", "float32"), folder / marker_file)
    safetensors_header(folder / WEIGHTS_FILE)  # a corrupt weight file fails before the build
    hf_config = read_hf_config(folder)
    try:
        model = model_class(hf_config)
    except (ValueError, KeyError, OSError, TypeError, AttributeError) as err:
        raise MoefyError(f"cannot build the model from {folder / HF_CONFIG_FILE}: {err}") from None
    if (folder / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model.eval(), dtype


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load the folder's safetensors into ``model`` strictly; a one-line error on a mismatch, a
    corrupt file or non-finite weights."""
    load_safetensors(model, folder / WEIGHTS_FILE)
