"""The saved-format table: one :class:`ChangeFormat` per kind of change moefy makes to a model.

Each package that changes models registers how its change is saved and replayed, beside its code
(ReLUfication in :mod:`moefy.finetune.relu`, MoEfication and routers in :mod:`moefy.moe.serialize`,
training-free sparsity in :mod:`moefy.sparsify.saving`, dropped layers in
:mod:`moefy.layers.saving`). :mod:`moefy.saving` writes and reads folders through this table
only, so a new kind of change is one module that calls :func:`register_format`.

Example:
    >>> register_format(ChangeFormat(name="moefy-mine", file="moefy_mine.json", rank=50,
    ...                              capture=..., replay=..., required=("mine",)))
    >>> SAVED_FORMATS.get("moefy-mine").value.file
    'moefy_mine.json'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from moefy.models.marked import read_marker
from moefy.registry import Registry

# name -> (shape, safetensors dtype code) of every tensor in the saved weights
Header = dict[str, tuple[tuple[int, ...], str]]

# the modules whose import registers moefy's own formats
_BUILTIN_MODULES = (
    "moefy.finetune.relu",
    "moefy.moe.serialize",
    "moefy.sparsify.saving",
    "moefy.layers.saving",
)


def _no_finish(model: nn.Module, record: dict[str, Any], replayed: Any) -> None:
    """Most changes need nothing after the weights are loaded."""


def _no_adoption(model: nn.Module) -> None:
    """Most changes leave no trace in a plain Hugging Face folder."""


@dataclass(frozen=True)
class ChangeFormat:
    """How one kind of change is saved (a record file) and loaded back (replayed on the model).

    Attributes:
        name: the record's ``format`` value and the change's name in the manifest.
        file: the record's file name in the folder (``"moefy_config.json"``).
        rank: replay order: changes are replayed by rising rank, the order in which moefy lets
            them be made (ReLU first, dropped layers last).
        capture: ``model -> record`` to write, or None when the model does not carry the change.
        read: ``folder -> record``, read and checked; one-line errors that name the file.
            Left out: the record is a marker that :func:`moefy.models.marked.read_marker`
            checks (its ``format`` is ``name``, its ``format_version`` at most ``version``, it
            holds the ``required`` keys).
        replay: ``(model, record, header, folder) -> state``: rebuild the change's structure on
            the model built on the meta device, before the weights load; compare recorded sizes
            with ``header`` before allocating anything.
        finish: ``(model, record, state)``: after the weights are loaded (checks, counters).
        adopt: ``model``: applied to a model read from a plain Hugging Face folder, for changes
            that leave a trace in its config (a FATReLU threshold).
        missing_hint: how to write a folder that carries the change, for a folder that does not.
        version: the newest record version this moefy reads (for the default ``read``).
        required: keys the record must hold (for the default ``read``).
    """

    name: str
    file: str
    rank: int
    capture: Callable[[nn.Module], dict[str, Any] | None]
    replay: Callable[[nn.Module, dict[str, Any], Header, Path], Any]
    read: Callable[[Path], dict[str, Any]] | None = None
    finish: Callable[[nn.Module, dict[str, Any], Any], None] = _no_finish
    adopt: Callable[[nn.Module], None] = _no_adoption
    missing_hint: str = "save the model with moefy.save"
    version: int = 1
    required: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.read is None:
            object.__setattr__(self, "read", self._read_marker)

    def _read_marker(self, folder: Path) -> dict[str, Any]:
        """The common record: a marker that :func:`read_marker` checks."""
        return read_marker(
            folder, self.file, self.name, self.version, self.required, self.missing_hint
        )


def same_place(path: str, saved: str) -> bool:
    """Whether ``saved`` (a module path in the saved model) names the module at ``path`` of the
    model being rebuilt: the same path, or that path nested deeper by a change replayed later
    (a dropped MLP or block keeps what it replaced under ``base_layer``).

    Example:
        >>> same_place("model.layers.0.mlp", "model.layers.0.mlp.base_layer.ffn")
        True
    """
    if not isinstance(saved, str):  # a hand-edited record
        return False
    if path == saved:
        return True
    items = iter(saved.split("."))
    return all(any(item == wanted for item in items) for wanted in path.split("."))


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


SAVED_FORMATS: Registry[ChangeFormat] = Registry("saved format", load=_import_builtins)


def register_format(change: ChangeFormat, *, overwrite: bool = False) -> ChangeFormat:
    """Make :func:`moefy.save` and :func:`moefy.load` handle one more kind of change.

    Args:
        change: the format (its ``name`` is the registry key).
        overwrite: replace a format of the same name.

    Returns:
        ``change``.
    """
    return SAVED_FORMATS.register(
        change.name, change, help=f"{change.file} (rank {change.rank})", overwrite=overwrite
    )


def ordered_formats() -> list[ChangeFormat]:
    """Every registered format, in replay order."""
    return sorted((entry.value for entry in SAVED_FORMATS.entries()), key=lambda f: f.rank)
