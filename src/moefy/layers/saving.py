"""Save a model with dropped layers and load it back with the same structure.

A folder written by :func:`save_dropped` holds

- ``config.json`` (and ``generation_config.json``, tokenizer files): the Hugging Face model;
- ``model.safetensors``: the state dict (dropped modules' weights under ``...base_layer...`` when
  they were kept; tied tensors stored once);
- ``moefy_layers.json``: format name and version, the model class and dtype, and the
  :class:`DropConfig` of what is dropped.

:func:`load_dropped` builds the model from its config, replays the drop (sublayers, then blocks,
as :func:`drop_layers_` does) and loads the state dict strictly. ``moefy.load_model(folder)``
recognises the folder by its marker file.
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
from moefy.layers.config import DropConfig
from moefy.layers.drop import drop_layers_, dropped_layers

FORMAT_NAME = "moefy-layers"
FORMAT_VERSION = 1
MARKER_FILE = "moefy_layers.json"
WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"


def save_dropped(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write a model with dropped layers to the folder ``path`` atomically.

    Args:
        model: a Hugging Face decoder changed by :func:`drop_layers_`.
        path: the folder (replaced if it exists).
        tokenizer: optional tokenizer to save alongside.
        extra_json: optional ``file name -> JSON-able object`` written in the same atomic step.

    Returns:
        The folder path.

    Raises:
        MoefyError: nothing is dropped, or the model has no Hugging Face config.

    Example:
        >>> drop_layers_(model, attention=[20, 22])
        >>> save_dropped(model, "runs/drop-attn-2", tokenizer=tokenizer)
        >>> same, tokenizer = moefy.load_model("runs/drop-attn-2")
    """
    from safetensors.torch import save_model

    from moefy import __version__

    dropped = dropped_layers(model)
    if dropped.is_empty:
        raise MoefyError("nothing is dropped: call drop_layers_ first, or save_pretrained")
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "save_pretrained"):
        raise MoefyError(f"{type(model).__name__} has no Hugging Face config to save")
    marker = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "moefy_version": __version__,
        "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "dropped": dropped.to_dict(),
    }
    with atomic_path(path) as tmp:
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
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return Path(path)


def _read_marker(folder: Path) -> dict[str, Any]:
    marker_path = folder / MARKER_FILE
    if not marker_path.is_file():
        raise MoefyError(
            f"{folder} is not a folder of a model with dropped layers (no {MARKER_FILE}): "
            "write one with save_dropped"
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
    for key in ("model_class", "dropped"):
        if key not in marker:
            raise MoefyError(f"{marker_path} lacks {key!r}: save the model again")
    return marker


def load_dropped(path: str | os.PathLike) -> nn.Module:
    """Load a folder written by :func:`save_dropped`: the same structure, weights and outputs.

    Args:
        path: the folder.

    Returns:
        The model with its layers dropped as saved, in eval mode.

    Raises:
        MoefyError: a missing, corrupt or mismatched folder.

    Example:
        >>> model = load_dropped("runs/drop-attn-2")
        >>> dropped_layers(model).attention
        (20, 22)
    """
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    folder = Path(path)
    if not folder.is_dir():
        raise MoefyError(f"no such folder: {folder}; give a folder written by save_dropped")
    marker = _read_marker(folder)
    dropped = DropConfig.from_dict(marker["dropped"])
    model_class = getattr(transformers, str(marker["model_class"]), None)
    if not isinstance(model_class, type) or not issubclass(model_class, nn.Module):
        raise MoefyError(
            f"{folder / MARKER_FILE} names model class {marker['model_class']!r}, which this "
            "transformers does not have: upgrade transformers or save again"
        )
    dtype = getattr(torch, str(marker.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise MoefyError(f"{folder / MARKER_FILE} has an unknown dtype {marker.get('dtype')!r}")
    try:
        hf_config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        model = model_class(hf_config)
    except (ValueError, KeyError, OSError, TypeError, AttributeError) as err:
        raise MoefyError(f"cannot build the model from {folder / HF_CONFIG_FILE}: {err}") from None
    if (folder / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    model.eval()
    drop_layers_(model, **dropped.indices(), keep_weights=dropped.keep_weights)
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
    return model.to(dtype).eval()
