"""PNG plots of a :class:`SparsityProfile` (matplotlib, Agg canvas; no GUI, no global state).

Shape legend:
    F: FFN width (d_ff) of a layer
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moefy.dist import is_main_process
from moefy.io import atomic_path
from moefy.profiling.result import SparsityProfile

_MAX_CURVE_LAYERS = 6  # layers drawn in the per-layer curve plots, spread over the depth
_DPI = 120
_FIGSIZE = (8.0, 5.0)
_PERCENT = 100.0


def _pick_layers(num_layers: int, count: int = _MAX_CURVE_LAYERS) -> list[int]:
    if num_layers <= count:
        return list(range(num_layers))
    step = (num_layers - 1) / (count - 1)
    return sorted({round(i * step) for i in range(count)})


def _new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = _FIGSIZE):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, axes


def _save(figure, path: Path) -> Path:
    with atomic_path(path, overwrite=True) as tmp:  # inside moefy's output folder
        figure.savefig(tmp, format="png")
    return path


def _title(profile: SparsityProfile, what: str) -> str:
    # the last part of a model folder path is its readable name
    name = Path(profile.fingerprint.get("model_name") or "").name
    name = name or profile.fingerprint.get("model_type", "model")
    return f"{what}: {name}, {profile.n_tokens} tokens"


def _sparsity_by_layer(profile: SparsityProfile, out_dir: Path) -> Path:
    config = profile.config
    figure, axes = _new_figure()
    ax = axes[0, 0]
    layers = [layer.index for layer in profile.layers]

    def line(values: list[float | None], label: str, **style) -> None:
        points = [(i, _PERCENT * v) for i, v in zip(layers, values, strict=True) if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label, **style)

    line([layer.exact_zero_fraction for layer in profile.layers], "exact zeros", color="black")
    threshold = config.rms_thresholds[len(config.rms_thresholds) // 2]
    line(
        [layer.below_rms_fraction[threshold] for layer in profile.layers],
        f"|h| < {threshold:g} x RMS",
        linestyle=":",
        color="grey",
    )
    for p, color in zip(
        config.shares, _colors(len(config.shares), "Blues", start=0.35), strict=True
    ):
        line(
            [layer.contribution_fraction[p] for layer in profile.layers],
            f"neurons for {_PERCENT * p:g} % of output",
            linestyle="--",
            color=color,
        )
    line(
        [layer.active_fraction for layer in profile.layers],
        f"active ({config.active_rule} rule)",
        linewidth=2.5,
        color="tab:red",
    )
    chunk = max(config.chunk_sizes)
    line(
        [layer.chunk_union_fraction[chunk] for layer in profile.layers],
        f"union over {chunk} tokens",
        linestyle="-.",
        color="tab:orange",
    )
    line(
        [layer.hot_fraction for layer in profile.layers],
        f"neurons with {_PERCENT * config.hot_share:g} % of activations",
        linestyle=(0, (1, 3)),
        color="tab:green",
    )
    ax.set_xlabel("FFN layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("% of neurons (or of activations)")
    ax.set_ylim(0, _PERCENT)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(_title(profile, "FFN sparsity by layer"))
    return _save(figure, out_dir / "sparsity_by_layer.png")


def _colors(count: int, name: str = "viridis", start: float = 0.0) -> list:
    from matplotlib import colormaps

    cmap = colormaps[name]
    return [cmap(start + (1.0 - start) * i / max(count - 1, 1)) for i in range(count)]


def _contribution_curves(profile: SparsityProfile, out_dir: Path) -> Path:
    figure, axes = _new_figure()
    ax = axes[0, 0]
    picked = _pick_layers(profile.num_layers)
    for color, i in zip(_colors(len(picked)), picked, strict=True):
        curve = profile.contribution_curve(i)  # (F+1,)
        F = curve.numel() - 1
        ax.plot(
            (_PERCENT * torch.arange(F + 1) / F).tolist(),
            (_PERCENT * curve).tolist(),
            color=color,
            label=f"layer {i}",
        )
    ax.plot([0, _PERCENT], [0, _PERCENT], color="grey", linestyle=":", label="uniform")
    for p in profile.config.shares:
        ax.axhline(_PERCENT * p, color="lightgrey", linewidth=0.8)
    ax.set_xlabel("strongest neurons of the token (% of d_ff)")
    ax.set_ylabel("share of the FFN output mass (%)")
    ax.set_xlim(0, _PERCENT)
    ax.set_ylim(0, _PERCENT)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(_title(profile, "Contribution share, mean over tokens"))
    return _save(figure, out_dir / "contribution_curves.png")


def _active_count_histograms(profile: SparsityProfile, out_dir: Path) -> Path:
    picked = _pick_layers(profile.num_layers, count=4)
    ncols = min(len(picked), 2)
    nrows = -(-len(picked) // ncols)
    figure, axes = _new_figure(nrows, ncols, figsize=(_FIGSIZE[0], 2.2 * nrows + 0.6))
    for ax, i in zip(axes.flat, picked, strict=False):
        histogram = profile.active_count_histogram(i)  # (F+1,)
        F = histogram.numel() - 1
        fraction = histogram / histogram.sum().clamp_min(1.0)
        ax.bar(
            (_PERCENT * torch.arange(F + 1) / F).tolist(),
            (_PERCENT * fraction).tolist(),
            width=_PERCENT / F,
            color="tab:blue",
        )
        mean = _PERCENT * profile.layers[i].active_fraction
        ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.1f} %")
        ax.set_title(f"layer {i}", fontsize="medium")
        ax.set_xlim(0, _PERCENT)
        ax.legend(fontsize="small")
    for ax in axes.flat[len(picked) :]:
        ax.set_visible(False)
    figure.supxlabel("active neurons per token (% of d_ff)")
    figure.supylabel("% of tokens")
    figure.suptitle(
        _title(profile, f"Active neurons per token ({profile.config.active_rule} rule)")
    )
    return _save(figure, out_dir / "active_count_histograms.png")


def _neuron_frequency(profile: SparsityProfile, out_dir: Path) -> Path:
    figure, axes = _new_figure()
    ax = axes[0, 0]
    picked = _pick_layers(profile.num_layers)
    for color, i in zip(_colors(len(picked)), picked, strict=True):
        frequency = torch.sort(profile.firing_frequency(i), descending=True).values  # (F,)
        F = frequency.numel()
        rank = _PERCENT * (torch.arange(F) + 0.5) / F
        ax.plot(
            rank.tolist(),
            (_PERCENT * frequency).tolist(),
            color=color,
            label=f"layer {i}: hot {_PERCENT * profile.layers[i].hot_fraction:.0f} %, "
            f"never {profile.layers[i].never_active}",
        )
    ax.set_xlabel("neurons, most frequently active first (% of d_ff)")
    ax.set_ylabel("active for % of tokens")
    ax.set_xlim(0, _PERCENT)
    ax.set_ylim(0, _PERCENT)
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize="small", title=f"hot: share carrying {_PERCENT * profile.config.hot_share:g} %"
    )
    ax.set_title(_title(profile, "Hot and cold neurons"))
    return _save(figure, out_dir / "neuron_frequency.png")


def write_plots(profile: SparsityProfile, out_dir: str | os.PathLike) -> list[Path]:
    """Draw the profile as PNG files in ``out_dir`` (each written atomically; rank 0 only).

    Plots: ``sparsity_by_layer.png`` (every summary statistic against depth),
    ``contribution_curves.png`` (share of the output mass carried by a token's strongest
    neurons), ``active_count_histograms.png`` (a few layers), ``neuron_frequency.png`` (firing
    frequency of neurons sorted hot to cold).

    Args:
        profile: the profile to draw.
        out_dir: the folder (created if needed).

    Returns:
        The paths written (empty on ranks other than 0).

    Example:
        >>> write_plots(SparsityProfile.load("runs/profile"), "runs/profile/plots")
    """
    if not is_main_process():
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        draw(profile, out_dir)
        for draw in (
            _sparsity_by_layer,
            _contribution_curves,
            _active_count_histograms,
            _neuron_frequency,
        )
    ]
