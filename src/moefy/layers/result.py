"""The result of :func:`moefy.layers.layer_importance`: per-block scores, rankings, JSON, plots.

Saved as one JSON file (written atomically) holding the format name and version, the config,
the model type, the number of tokens, the dense perplexity and one record per block.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from moefy.errors import MoefyError
from moefy.io import write_json
from moefy.jsonconfig import read_json
from moefy.layers.config import LayerImportanceConfig
from moefy.layers.sites import ATTENTION, BLOCK, MLP, PARTS

IMPORTANCE_FORMAT = "moefy.layer_importance"
IMPORTANCE_VERSION = 1


@dataclass(frozen=True)
class LayerScores:
    """The scores of one block.

    Attributes:
        index: block number.
        name: module path of the block.
        attention_similarity, mlp_similarity, block_similarity: mean cosine similarity of the
            residual stream before and after the part (1: the part changes nothing).
        attention_perplexity, mlp_perplexity, block_perplexity: perplexity with only that part
            removed; None when not measured (or not removable alone: the last attention layer).
    """

    index: int
    name: str
    attention_similarity: float
    mlp_similarity: float
    block_similarity: float
    attention_perplexity: float | None = None
    mlp_perplexity: float | None = None
    block_perplexity: float | None = None

    def similarity(self, part: str) -> float:
        """The similarity of ``part`` (``attention``, ``mlp`` or ``block``)."""
        return getattr(self, f"{_check_part(part)}_similarity")

    def perplexity(self, part: str) -> float | None:
        """The perplexity without ``part``, or None when not measured."""
        return getattr(self, f"{_check_part(part)}_perplexity")


def _check_part(part: str) -> str:
    if part not in PARTS:
        raise MoefyError(f"unknown part {part!r}: choose one of {', '.join(PARTS)}")
    return part


@dataclass(frozen=True)
class LayerImportance:
    """Similarity (and optionally perplexity) scores of every block, attention sublayer and MLP.

    Attributes:
        layers: one :class:`LayerScores` per block, in order.
        n_tokens: tokens the similarities average over.
        dense_perplexity: perplexity with nothing removed, when perplexities were measured.
        model_type: ``config.model_type`` of the measured model.
        config: the :class:`LayerImportanceConfig` used.

    Example:
        >>> importance = layer_importance(model, blocks)
        >>> importance.most_redundant("block", 2)
        [26, 25]
        >>> importance.save("runs/layers/importance.json")
    """

    layers: tuple[LayerScores, ...]
    n_tokens: int
    dense_perplexity: float | None
    model_type: str
    config: LayerImportanceConfig

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    @property
    def has_perplexity(self) -> bool:
        """Whether perplexities without each part were measured."""
        return self.dense_perplexity is not None

    def most_redundant(self, part: str, n: int) -> list[int]:
        """The ``n`` block numbers whose ``part`` has the highest similarity, most redundant first.

        Args:
            part: ``attention``, ``mlp`` or ``block``.
            n: how many, 0..number of blocks.

        Returns:
            Block numbers; ties go to the earlier block.
        """
        _check_part(part)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.num_blocks:
            raise MoefyError(f"n must be a whole number in 0..{self.num_blocks}, got {n!r}")
        ranked = sorted(self.layers, key=lambda row: (-row.similarity(part), row.index))
        return [row.index for row in ranked[:n]]

    def rows(self) -> list[dict[str, Any]]:
        """One table row per block: similarities and, when measured, perplexity increases."""
        rows = []
        for layer in self.layers:
            row: dict[str, Any] = {
                "block": layer.index,
                "attn sim": layer.attention_similarity,
                "mlp sim": layer.mlp_similarity,
                "block sim": layer.block_similarity,
            }
            if self.has_perplexity:
                for part, label in ((ATTENTION, "attn"), (MLP, "mlp"), (BLOCK, "block")):
                    value = layer.perplexity(part)
                    row[f"{label} dppl"] = (
                        math.nan if value is None else value - self.dense_perplexity
                    )
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what :meth:`save` writes)."""
        return {
            "format": IMPORTANCE_FORMAT,
            "version": IMPORTANCE_VERSION,
            "model_type": self.model_type,
            "n_tokens": self.n_tokens,
            "dense_perplexity": self.dense_perplexity,
            "config": self.config.to_dict(),
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerImportance:
        """The result :meth:`to_dict` wrote."""
        if not isinstance(data, dict) or data.get("format") != IMPORTANCE_FORMAT:
            raise MoefyError("not a moefy layer-importance record (wrong or missing 'format')")
        version = data.get("version")
        if not isinstance(version, int) or version > IMPORTANCE_VERSION:
            raise MoefyError(
                f"layer-importance version {version!r}: this moefy reads up to "
                f"{IMPORTANCE_VERSION}; upgrade moefy"
            )
        known = {f.name for f in fields(LayerScores)}
        try:
            layers = tuple(
                LayerScores(**{k: v for k, v in row.items() if k in known})
                for row in data["layers"]
            )
            return cls(
                layers=layers,
                n_tokens=int(data["n_tokens"]),
                dense_perplexity=data.get("dense_perplexity"),
                model_type=str(data["model_type"]),
                config=LayerImportanceConfig.from_dict(data["config"]),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise MoefyError(f"malformed layer-importance record ({err})") from None

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the result as JSON to ``path`` atomically (an existing file is replaced only
        with ``overwrite``); returns the path."""
        write_json(path, self.to_dict(), overwrite=overwrite)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LayerImportance:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise MoefyError(f"no such file: {path}; write one with LayerImportance.save")
        return cls.from_dict(read_json(path, f"{path} is not valid JSON"))

    def plot(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write PNG plots per block of both measures into ``out_dir``; returns their paths."""
        from moefy.layers.plots import plot_importance

        return plot_importance(self, out_dir)
