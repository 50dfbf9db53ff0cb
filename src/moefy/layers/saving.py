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

import os
from pathlib import Path
from typing import Any

from torch import nn

from moefy.errors import MoefyError
from moefy.layers.config import DropConfig
from moefy.layers.drop import drop_layers_, dropped_layers
from moefy.models.marked import (
    base_marker,
    build_model,
    load_weights,
    read_marker,
    write_marked_folder,
)

FORMAT_NAME = "moefy-layers"
FORMAT_VERSION = 1
MARKER_FILE = "moefy_layers.json"


def save_dropped(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    extra_json: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model with dropped layers to the folder ``path`` atomically.

    Args:
        model: a Hugging Face decoder changed by :func:`drop_layers_`.
        path: the folder.
        tokenizer: optional tokenizer to save alongside.
        extra_json: optional ``file name -> JSON-able object`` written in the same atomic step.
        overwrite: replace ``path`` if moefy wrote it before (a folder moefy did not write is
            never replaced; see :mod:`moefy.io`).

    Returns:
        The folder path.

    Raises:
        MoefyError: nothing is dropped, or the model has no Hugging Face config.

    Example:
        >>> drop_layers_(model, attention=[20, 22])
        >>> save_dropped(model, "runs/drop-attn-2", tokenizer=tokenizer)
        >>> same, tokenizer = moefy.load_model("runs/drop-attn-2")
    """
    dropped = dropped_layers(model)
    if dropped.is_empty:
        raise MoefyError("nothing is dropped: call drop_layers_ first, or save_pretrained")
    marker = {**base_marker(model, FORMAT_NAME, FORMAT_VERSION), "dropped": dropped.to_dict()}
    return write_marked_folder(
        model,
        path,
        MARKER_FILE,
        marker,
        tokenizer=tokenizer,
        extra_json=extra_json,
        set_architectures=True,
        overwrite=overwrite,
    )


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
    folder = Path(path)
    if not folder.is_dir():
        raise MoefyError(f"no such folder: {folder}; give a folder written by save_dropped")
    marker = read_marker(
        folder,
        MARKER_FILE,
        FORMAT_NAME,
        FORMAT_VERSION,
        ("dropped",),
        "it is not a folder of a model with dropped layers; write one with save_dropped",
    )
    try:
        dropped = DropConfig.from_dict(marker["dropped"])
    except MoefyError as err:
        raise MoefyError(f"{folder / MARKER_FILE}: {err}: save the model again") from None
    model, dtype = build_model(folder, marker, MARKER_FILE)
    try:
        drop_layers_(model, **dropped.indices(), keep_weights=dropped.keep_weights)
    except MoefyError as err:  # layer numbers the model does not have
        raise MoefyError(f"{folder / MARKER_FILE}: {err}: save the model again") from None
    load_weights(model, folder)
    return model.to(dtype).eval()
