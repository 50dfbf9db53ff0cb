"""PNG plots of a :class:`LayerImportance` (matplotlib on an Agg canvas; no GUI, no global state):
the similarity per block of attention, MLP and block, and the perplexity increase per removed
part when it was measured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moefy.io import atomic_path
from moefy.layers.sites import ATTENTION, BLOCK, MLP

SIMILARITY_PLOT = "layer_similarity.png"
PERPLEXITY_PLOT = "layer_perplexity.png"
_DPI = 120
_FIGSIZE = (8.0, 5.0)
_STYLES = {
    ATTENTION: dict(color="tab:blue", marker="o", label="attention"),
    MLP: dict(color="tab:orange", marker="s", label="MLP"),
    BLOCK: dict(color="black", marker="^", label="block", linestyle="--"),
}
_MARKER_SIZE = 3


def _new_axes():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _save(figure, path: Path) -> Path:
    with atomic_path(path, overwrite=True) as tmp:  # inside moefy's output folder
        figure.savefig(tmp, format="png")
    return path


def plot_importance(importance: Any, out_dir: str | os.PathLike) -> list[Path]:
    """Write the plots of ``importance`` into ``out_dir``.

    Args:
        importance: the scores to draw, a :class:`moefy.layers.LayerImportance` (read through
            its ``layers``, ``model_type``, ``n_tokens`` and perplexities only, so this module
            needs no import of it; :meth:`LayerImportance.plot` calls this).
        out_dir: folder for the PNG files (created if missing).

    Returns:
        The paths written: the similarity plot, and the perplexity plot when perplexities were
        measured.
    """
    out_dir = Path(out_dir)
    blocks = [layer.index for layer in importance.layers]
    title = f"{importance.model_type}, {importance.n_tokens} tokens"

    figure, ax = _new_axes()
    for part, style in _STYLES.items():
        values = [layer.similarity(part) for layer in importance.layers]
        ax.plot(blocks, values, markersize=_MARKER_SIZE, **style)
    ax.set_xlabel("block")
    ax.set_ylabel("cos(input, output) of the residual stream")
    ax.set_title(f"Similarity (higher = more redundant): {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    paths = [_save(figure, out_dir / SIMILARITY_PLOT)]

    if importance.has_perplexity:
        figure, ax = _new_axes()
        dense = importance.dense_perplexity
        for part, style in _STYLES.items():
            points = [
                (layer.index, layer.perplexity(part) / dense)
                for layer in importance.layers
                if layer.perplexity(part) is not None
            ]
            if points:
                ax.plot(*zip(*points, strict=True), markersize=_MARKER_SIZE, **style)
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("perplexity without the part / dense perplexity")
        ax.set_title(f"Perplexity with one part removed (dense {dense:.2f}): {title}")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        paths.append(_save(figure, out_dir / PERPLEXITY_PLOT))
    return paths
