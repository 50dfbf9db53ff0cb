"""The layers change of moefy's saved format: models with dropped layers saved and loaded back.

A model with dropped layers saves, beside the Hugging Face config and the whole state dict
(dropped modules' weights under ``...base_layer...`` when they were kept; tied tensors stored
once), ``moefy_layers.json``: format name and version, the model class and dtype, and the
:class:`DropConfig` of what is dropped. Loading replays the drop (sublayers, then blocks, as
:func:`drop_layers_` does) on the base model built on the meta device and loads the state dict
strictly. :func:`save_dropped` and :func:`load_dropped` are :func:`moefy.save` and
:func:`moefy.load` for models that must have dropped layers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from moefy.arch.registry import DROPPED_MARK
from moefy.errors import MoefyError
from moefy.layers.config import DropConfig
from moefy.layers.drop import drop_layers_, dropped_layers
from moefy.models.marked import base_marker
from moefy.saving.changes import ChangeFormat, Header, register_format
from moefy.saving.folder import load_carrying, save_carrying

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
    """Write a model with dropped layers (and any other change moefy made) to ``path``.

    Args:
        model: a Hugging Face decoder changed by :func:`drop_layers_`.
        path: the folder.
        tokenizer: saved alongside when given.
        extra_json: ``file name -> JSON-able object`` written in the same atomic step (reports,
            measurements).
        overwrite: replace ``path`` if moefy wrote it before (as :func:`moefy.save`).

    Returns:
        The folder path.

    Raises:
        MoefyError: nothing is dropped, or the model has no Hugging Face config.

    Example:
        >>> drop_layers_(model, attention=[20, 22])
        >>> save_dropped(model, "runs/drop-attn-2", tokenizer=tokenizer)
        >>> same, tokenizer = moefy.load_model("runs/drop-attn-2")
    """
    absent = "nothing is dropped: call drop_layers_ first, or save_pretrained"
    return save_carrying(
        FORMAT_NAME,
        model,
        path,
        absent=absent,
        tokenizer=tokenizer,
        extra_json=extra_json,
        overwrite=overwrite,
    )


def load_dropped(path: str | os.PathLike) -> nn.Module:
    """Load a folder written by :func:`save_dropped`: the same structure, weights and outputs.

    Args:
        path: the folder.

    Returns:
        The model with its layers dropped as saved (and any other change it was saved with),
        in eval mode.

    Raises:
        MoefyError: a missing, corrupt or mismatched folder.

    Example:
        >>> model = load_dropped("runs/drop-attn-2")
        >>> dropped_layers(model).attention
        (20, 22)
    """
    return load_carrying(FORMAT_NAME, path, writer="save_dropped")


def _capture(model: nn.Module) -> dict[str, Any] | None:
    """The record of a model with dropped layers, or None when nothing is dropped."""
    if not any(getattr(module, DROPPED_MARK, False) for module in model.modules()):
        return None
    dropped = dropped_layers(model)
    if dropped.is_empty:
        return None
    return {**base_marker(model, FORMAT_NAME, FORMAT_VERSION), "dropped": dropped.to_dict()}


def _replay(model: nn.Module, record: dict[str, Any], header: Header, folder: Path) -> None:
    """Drop what the record lists (the stand-ins keep meta copies the weights fill)."""
    try:
        dropped = DropConfig.from_dict(record["dropped"])
        drop_layers_(model, **dropped.indices(), keep_weights=dropped.keep_weights)
    except MoefyError as err:  # a bad record, or layer numbers the model does not have
        raise MoefyError(f"{folder / MARKER_FILE}: {err}: save the model again") from None


register_format(
    ChangeFormat(
        name=FORMAT_NAME,
        file=MARKER_FILE,
        rank=40,
        capture=_capture,
        replay=_replay,
        missing_hint=(
            "it is not a folder of a model with dropped layers; write one with save_dropped"
        ),
        version=FORMAT_VERSION,
        required=("dropped",),
    )
)
