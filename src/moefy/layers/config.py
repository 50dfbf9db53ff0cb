"""Configs of the layer-redundancy verbs: what to drop, and how to measure importance.

Both are frozen dataclasses, validated on construction, with a ``version`` and a JSON round trip,
so the CLI, a saved model folder and Python build the same object.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from moefy.errors import MoefyError
from moefy.jsonconfig import JsonConfig
from moefy.validate import check_bool, check_int

DROP_CONFIG_VERSION = 1
IMPORTANCE_CONFIG_VERSION = 1
DEFAULT_BATCH_SIZE = 8


def _indices(name: str, values: Iterable[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated layer numbers; refuses negatives, bools and non-integers."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise MoefyError(f"{name} must be a list of layer numbers, got {values!r}")
    out = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise MoefyError(f"{name}: layer numbers are integers >= 0, got {value!r}")
        out.add(int(value))
    return tuple(sorted(out))


@dataclass(frozen=True)
class DropConfig(JsonConfig):
    """Which parts of which blocks are dropped.

    Attributes:
        attention: block numbers whose attention sublayer is dropped.
        mlp: block numbers whose MLP is dropped.
        blocks: block numbers dropped whole.
        keep_weights: dropped modules keep their weights (in memory and in saved folders), so
            :func:`moefy.layers.restore_layers` can put them back; False frees them.
        version: config format version.

    Example:
        >>> DropConfig(attention=(3, 5), blocks=(7,)).to_dict()["attention"]
        [3, 5]
    """

    attention: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()
    blocks: tuple[int, ...] = ()
    keep_weights: bool = True
    version: int = DROP_CONFIG_VERSION

    VERSION: ClassVar[int] = DROP_CONFIG_VERSION

    def __post_init__(self) -> None:
        for name in ("attention", "mlp", "blocks"):
            object.__setattr__(self, name, _indices(name, getattr(self, name)))
        check_bool("keep_weights", self.keep_weights)
        self.check_version()

    @property
    def is_empty(self) -> bool:
        """Nothing is dropped."""
        return not (self.attention or self.mlp or self.blocks)

    def indices(self) -> dict[str, tuple[int, ...]]:
        """``{"attention": ..., "mlp": ..., "blocks": ...}``, the index arguments of
        :func:`moefy.layers.drop_layers_`."""
        return {"attention": self.attention, "mlp": self.mlp, "blocks": self.blocks}

    def union(self, other: DropConfig) -> DropConfig:
        """Everything either config drops (``keep_weights`` from ``other``)."""
        return DropConfig(
            attention=self.attention + other.attention,
            mlp=self.mlp + other.mlp,
            blocks=self.blocks + other.blocks,
            keep_weights=other.keep_weights,
        )


@dataclass(frozen=True)
class LayerImportanceConfig(JsonConfig):
    """How :func:`moefy.layers.layer_importance` measures.

    Attributes:
        batch_size: token blocks per forward pass.
        perplexity: also measure the perplexity with each attention sublayer, MLP and block
            removed on its own: three perplexity runs per block (costly on deep models).
        version: config format version.
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    perplexity: bool = False
    version: int = IMPORTANCE_CONFIG_VERSION

    VERSION: ClassVar[int] = IMPORTANCE_CONFIG_VERSION

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, minimum=1)
        check_bool("perplexity", self.perplexity)
        self.check_version()
