"""Marked model folders: a Hugging Face model saved with versioned moefy record files.

A changed model (relufied, moefied, routed, sparsified, layers dropped, alone or combined) is
saved as

- ``config.json`` (and ``generation_config.json``, tokenizer files): the Hugging Face model;
- ``model.safetensors``: the changed model's whole state dict (tied tensors stored once);
- one record JSON per change (``moefy_config.json``, ``moefy_sparsify.json``, ...): format name
  and version, the moefy version, model class and dtype, plus what the change needs to be
  replayed; and the manifest that lists them in order (:mod:`moefy.saving`).

Loading builds the plain model from its config with its parameters on the meta device, lets
each change replay its structure, then loads the state dict strictly, assigning the saved
tensors (the numbers). This module holds the parts every change shares.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from moefy.errors import MoefyError
from moefy.io import FOLDER, atomic_path, check_output
from moefy.jsonconfig import read_json
from moefy.models.hf_config import HF_CONFIG_FILE, read_hf_config
from moefy.models.weights import float_dtype, load_safetensors_assigned, safetensors_header

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
    records: dict[str, dict[str, Any]],
    *,
    tokenizer: Any = None,
    extra_json: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write config, generation config, tokenizer, extra JSON, weights and records atomically.

    Args:
        model: a Hugging Face model (with ``config``).
        path: the folder (nothing half-written is left on failure).
        records: ``file name -> record`` (see :func:`base_marker`), written last.
        tokenizer: optional tokenizer to save alongside.
        extra_json: optional ``file name -> JSON-able object`` written in the same step.
        overwrite: replace ``path`` if moefy wrote it before (a folder moefy did not write is
            never replaced; see :mod:`moefy.io`).

    Returns:
        The folder path.

    Raises:
        MoefyError: the model has no Hugging Face config, or ``path`` is refused.

    Example:
        >>> write_marked_folder(model, "runs/x", {"moefy_layers.json": record})
    """
    from safetensors.torch import save_model

    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "save_pretrained"):
        raise MoefyError(
            f"{type(model).__name__} has no Hugging Face config: save its state_dict yourself"
        )
    path = check_output(path, FOLDER, overwrite=overwrite, option="path")
    with atomic_path(path, FOLDER, overwrite=overwrite) as tmp:
        tmp.mkdir()
        hf_config = type(hf_config).from_dict(hf_config.to_dict())  # a copy we may edit
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config  # weights are saved dequantised
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
        for name, record in records.items():
            (tmp / name).write_text(json.dumps(record, indent=2) + "\n")
    return path


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
    marker = read_json(marker_path, f"{marker_path} is corrupt", ": save the model again")
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
    """The plain model the marker names, built from the folder's config with its parameters on
    the meta device (nothing allocated; buffers such as rotary tables are real), in eval mode.

    Returns:
        ``(model, dtype)``: the model and the dtype to cast it to after loading.
    """
    import transformers
    from accelerate import init_empty_weights

    model_class = getattr(transformers, str(marker["model_class"]), None)
    if not isinstance(model_class, type) or not issubclass(model_class, nn.Module):
        raise MoefyError(
            f"{folder / marker_file} names model class {marker['model_class']!r}, which is not a "
            "transformers model class: upgrade transformers or save again"
        )
    dtype = float_dtype(marker.get("dtype", "float32"), folder / marker_file)
    safetensors_header(folder / WEIGHTS_FILE)  # a corrupt weight file fails before the build
    hf_config = read_hf_config(folder)
    try:
        with init_empty_weights(include_buffers=False):
            model = model_class(hf_config)
        model.tie_weights()  # the meta context wraps each parameter anew, which unties them
    except (ValueError, KeyError, OSError, TypeError, AttributeError) as err:
        raise MoefyError(f"cannot build the model from {folder / HF_CONFIG_FILE}: {err}") from None
    if (folder / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model.eval(), dtype


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load the folder's safetensors into ``model`` (built by :func:`build_model`) strictly,
    assigning the saved tensors; a one-line error on a mismatch, a corrupt file or non-finite
    weights."""
    load_safetensors_assigned(model, folder / WEIGHTS_FILE)
