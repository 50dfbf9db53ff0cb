"""Save and load sparsified models: HF config, safetensors with the thresholds, a versioned marker.

A folder written by :func:`save_sparse` holds

- ``config.json``: the Hugging Face model config;
- ``model.safetensors``: the sparsified model's state dict (wrapped layers under
  ``...base_layer.weight``, thresholds as ``...threshold``);
- ``moefy_sparsify.json``: format name and version, the sparsify config, the model class and the
  wrapped paths.

:func:`load_sparse` builds the model from its config, installs the same wrappers from the
sparsify config (the structure) and loads the state dict strictly (the numbers), so the loaded
model computes what the saved one did.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.io import atomic_path
from moefy.sparsify.config import config_from_dict
from moefy.sparsify.methods import handler_for
from moefy.sparsify.wrappers import SPARSIFY_CONFIG_ATTR, reset_counters, sparse_modules

FORMAT_NAME = "moefy-sparsify"
FORMAT_VERSION = 1
MARKER_FILE = "moefy_sparsify.json"
WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"


def save_sparse(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write a sparsified model to the folder ``path`` atomically (replacing what is there).

    Args:
        model: a Hugging Face model changed by ``sparsify_`` (or loaded by :func:`load_sparse`).
        path: the folder to write.
        tokenizer: optional tokenizer to save alongside.
        extra_json: optional ``file name -> JSON-able object`` written into the same folder in
            the same atomic step (reports, measurements).

    Returns:
        The folder path.

    Raises:
        MoefyError: the model is not sparsified, or has no Hugging Face config.

    Example:
        >>> sparsify_(model, TEALConfig(sparsity=0.5), blocks)
        >>> save_sparse(model, "runs/teal50")
    """
    from safetensors.torch import save_model

    from moefy import __version__

    config = getattr(model, SPARSIFY_CONFIG_ATTR, None)
    wrapped = [name for name, _ in sparse_modules(model)]
    if config is None or not wrapped:
        raise MoefyError("the model is not sparsified: call sparsify_(model, config, data) first")
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "save_pretrained"):
        raise MoefyError(
            f"{type(model).__name__} has no Hugging Face config: save its state_dict yourself"
        )
    parameter = next(model.parameters())
    marker = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "moefy_version": __version__,
        "model_class": type(model).__name__,
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "sparsify_config": config.to_dict(),
        "wrapped": wrapped,
    }
    with atomic_path(path) as tmp:
        tmp.mkdir()
        hf_config = type(hf_config).from_dict(hf_config.to_dict())  # a copy we may edit
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config  # weights are saved dequantised
        hf_config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        # save_model drops duplicates of tied tensors (tied embeddings); load_model restores them.
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return Path(path)


def _read_marker(folder: Path) -> dict[str, Any]:
    marker_path = folder / MARKER_FILE
    if not marker_path.is_file():
        raise MoefyError(
            f"{folder} is not a moefy sparse model folder (no {MARKER_FILE}): write one with "
            "save_sparse(model, folder)"
        )
    try:
        marker = json.loads(marker_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoefyError(f"{marker_path} is corrupt ({err}): save the model again") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
        raise MoefyError(f"{marker_path} is not a {FORMAT_NAME} marker: save the model again")
    version = marker.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MoefyError(
            f"{marker_path} has format version {version!r}; this moefy reads up to "
            f"{FORMAT_VERSION}: upgrade moefy"
        )
    for key in ("model_class", "sparsify_config", "wrapped"):
        if key not in marker:
            raise MoefyError(f"{marker_path} lacks {key!r}: save the model again")
    return marker


def load_sparse(path: str | os.PathLike) -> nn.Module:
    """Load a folder written by :func:`save_sparse`: a sparsified model in eval mode.

    Args:
        path: the folder.

    Returns:
        The model, with its wrappers, thresholds and weights as saved.

    Raises:
        MoefyError: a missing, corrupt or mismatched folder (marker, config, weights or wrapped
            layers that do not fit together).

    Example:
        >>> model = load_sparse("runs/teal50")
        >>> measure(model, eval_blocks).total
    """
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    folder = Path(path)
    if not folder.is_dir():
        raise MoefyError(f"no such folder: {folder}; give a folder written by save_sparse")
    marker = _read_marker(folder)
    config = config_from_dict(marker["sparsify_config"])
    model_class = getattr(transformers, str(marker["model_class"]), None)
    if not isinstance(model_class, type) or not issubclass(model_class, nn.Module):
        raise MoefyError(
            f"{folder / MARKER_FILE} names model class {marker['model_class']!r}, which this "
            "transformers does not have: upgrade transformers or save again"
        )
    try:
        hf_config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise MoefyError(f"cannot read {folder / HF_CONFIG_FILE}: {err}") from None
    dtype = getattr(torch, str(marker.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise MoefyError(f"{folder / MARKER_FILE} has an unknown dtype {marker.get('dtype')!r}")
    try:
        model = model_class(hf_config)
    except (ValueError, TypeError, AttributeError) as err:
        raise MoefyError(
            f"{folder / HF_CONFIG_FILE} does not fit {model_class.__name__}: {err}"
        ) from None
    model.eval()
    wrapped = handler_for(config).install(model, config)
    if [name for name, _ in wrapped] != list(marker["wrapped"]):
        raise MoefyError(
            f"{folder}: the saved wrapped layers do not match what {config.method} installs on "
            "this model: save the model again with this moefy"
        )
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise MoefyError(f"{weights} is missing: save the model again")
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoefyError(
            f"{weights} does not match the model ({first_line}): save it again"
        ) from None
    model.to(dtype)
    reset_counters(model)
    setattr(model, SPARSIFY_CONFIG_ATTR, config)
    return model
