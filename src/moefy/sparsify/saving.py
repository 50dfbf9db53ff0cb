"""The sparsify change of moefy's saved format: sparsified models saved and loaded back.

A sparsified model saves, beside the Hugging Face config and the whole state dict (wrapped
layers under ``...base_layer.weight``, thresholds as ``...threshold``), ``moefy_sparsify.json``:
format name and version, the sparsify config, the model class and the wrapped paths. Loading
installs the same wrappers from the sparsify config on the base model built on the meta device
(the structure), then loads the state dict strictly (the numbers), so the loaded model computes
what the saved one did. :func:`save_sparse` and :func:`load_sparse` are :func:`moefy.save` and
:func:`moefy.load` for models that must be sparsified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from moefy.errors import MoefyError
from moefy.models.marked import base_marker
from moefy.saving.changes import ChangeFormat, Header, register_format, same_place
from moefy.saving.folder import load_carrying, save_carrying
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
    """Write a sparsified model (and any other change moefy made to it) to the folder ``path``.

    Args:
        model: a Hugging Face model changed by ``sparsify_`` (or loaded by :func:`load_sparse`).
        path: the folder to write.
        tokenizer: saved alongside when given.
        extra_json: ``file name -> JSON-able object`` written in the same atomic step (reports,
            measurements).
        overwrite: replace ``path`` if moefy wrote it before (as :func:`moefy.save`).

    Returns:
        The folder path.

    Raises:
        MoefyError: the model is not sparsified, or has no Hugging Face config.

    Example:
        >>> sparsify_(model, TEALConfig(sparsity=0.5), blocks)
        >>> save_sparse(model, "runs/teal50")
    """
    absent = "the model is not sparsified: call sparsify_(model, config, data) first"
    return save_carrying(
        FORMAT_NAME,
        model,
        path,
        absent=absent,
        tokenizer=tokenizer,
        extra_json=extra_json,
        overwrite=overwrite,
    )


def load_sparse(path: str | os.PathLike) -> nn.Module:
    """Load a folder written by :func:`save_sparse`: a sparsified model in eval mode.

    Args:
        path: the folder.

    Returns:
        The model, with its wrappers, thresholds and weights as saved (and any other change it
        was saved with).

    Raises:
        MoefyError: a missing, corrupt or mismatched folder (marker, config, weights or wrapped
            layers that do not fit together).

    Example:
        >>> model = load_sparse("runs/teal50")
        >>> measure(model, eval_blocks).total
    """
    return load_carrying(FORMAT_NAME, path, writer="save_sparse")


def _capture(model: nn.Module) -> dict[str, Any] | None:
    """The record of a sparsified model, or None for a model that is not."""
    config = getattr(model, SPARSIFY_CONFIG_ATTR, None)
    wrapped = [name for name, _ in sparse_modules(model)]
    if config is None or not wrapped:
        return None
    return {
        **base_marker(model, FORMAT_NAME, FORMAT_VERSION),
        "sparsify_config": config.to_dict(),
        "wrapped": wrapped,
    }


def _replay(model: nn.Module, record: dict[str, Any], header: Header, folder: Path) -> Any:
    """Install the recorded method's wrappers (their thresholds come with the weights)."""
    try:
        config = config_from_dict(record["sparsify_config"])
    except MoefyError as err:
        raise MoefyError(f"{folder / MARKER_FILE}: {err}: save the model again") from None
    wrapped = handler_for(config).install(model, config)
    installed = [name for name, _ in wrapped]
    saved = record["wrapped"]
    if (
        not isinstance(saved, list)
        or len(installed) != len(saved)
        or not all(map(same_place, installed, saved))
    ):
        raise MoefyError(
            f"{folder}: the saved wrapped layers do not match what {config.method} installs on "
            "this model: save the model again with this moefy"
        )
    return config


def _finish(model: nn.Module, record: dict[str, Any], config: Any) -> None:
    reset_counters(model)
    setattr(model, SPARSIFY_CONFIG_ATTR, config)


register_format(
    ChangeFormat(
        name=FORMAT_NAME,
        file=MARKER_FILE,
        rank=30,
        capture=_capture,
        replay=_replay,
        finish=_finish,
        missing_hint=(
            "it is not a moefy sparse model folder; write one with save_sparse(model, folder)"
        ),
        version=FORMAT_VERSION,
        required=("sparsify_config", "wrapped"),
    )
)
