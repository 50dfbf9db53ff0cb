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

import os
from pathlib import Path
from typing import Any

from torch import nn

from moefy.errors import MoefyError
from moefy.models.marked import (
    base_marker,
    build_model,
    load_weights,
    read_marker,
    write_marked_folder,
)
from moefy.sparsify.config import config_from_dict
from moefy.sparsify.methods import handler_for
from moefy.sparsify.wrappers import SPARSIFY_CONFIG_ATTR, reset_counters, sparse_modules

FORMAT_NAME = "moefy-sparsify"
FORMAT_VERSION = 1
MARKER_FILE = "moefy_sparsify.json"


def save_sparse(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    extra_json: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a sparsified model to the folder ``path`` atomically.

    Args:
        model: a Hugging Face model changed by ``sparsify_`` (or loaded by :func:`load_sparse`).
        path: the folder to write.
        tokenizer: optional tokenizer to save alongside.
        extra_json: optional ``file name -> JSON-able object`` written into the same folder in
            the same atomic step (reports, measurements).
        overwrite: replace ``path`` if moefy wrote it before (a folder moefy did not write is
            never replaced; see :mod:`moefy.io`).

    Returns:
        The folder path.

    Raises:
        MoefyError: the model is not sparsified, or has no Hugging Face config.

    Example:
        >>> sparsify_(model, TEALConfig(sparsity=0.5), blocks)
        >>> save_sparse(model, "runs/teal50")
    """
    config = getattr(model, SPARSIFY_CONFIG_ATTR, None)
    wrapped = [name for name, _ in sparse_modules(model)]
    if config is None or not wrapped:
        raise MoefyError("the model is not sparsified: call sparsify_(model, config, data) first")
    marker = {
        **base_marker(model, FORMAT_NAME, FORMAT_VERSION),
        "sparsify_config": config.to_dict(),
        "wrapped": wrapped,
    }
    return write_marked_folder(
        model,
        path,
        MARKER_FILE,
        marker,
        tokenizer=tokenizer,
        extra_json=extra_json,
        overwrite=overwrite,
    )


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
    folder = Path(path)
    if not folder.is_dir():
        raise MoefyError(f"no such folder: {folder}; give a folder written by save_sparse")
    marker = read_marker(
        folder,
        MARKER_FILE,
        FORMAT_NAME,
        FORMAT_VERSION,
        ("sparsify_config", "wrapped"),
        "it is not a moefy sparse model folder; write one with save_sparse(model, folder)",
    )
    try:
        config = config_from_dict(marker["sparsify_config"])
    except MoefyError as err:
        raise MoefyError(f"{folder / MARKER_FILE}: {err}: save the model again") from None
    model, dtype = build_model(folder, marker, MARKER_FILE)
    wrapped = handler_for(config).install(model, config)
    if [name for name, _ in wrapped] != marker["wrapped"]:
        raise MoefyError(
            f"{folder}: the saved wrapped layers do not match what {config.method} installs on "
            "this model: save the model again with this moefy"
        )
    load_weights(model, folder)
    model.to(dtype)
    reset_counters(model)
    setattr(model, SPARSIFY_CONFIG_ATTR, config)
    return model
