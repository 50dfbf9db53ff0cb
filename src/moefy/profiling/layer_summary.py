"""One FFN layer's sparsity, summarised from the profiler's accumulated sums.

Shape legend:
    F: FFN width (d_ff) of a layer, K: |h| histogram bins
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moefy.profiling.accumulators import fraction_below
from moefy.profiling.config import ProfileConfig

_PERCENT = 100.0
# the contribution shares shown in the printed table (when the config measured them)
_TABLE_SHARES = (0.5, 0.9, 0.99)
_TABLE_CHUNK = 16
# the share of most often top neurons whose mean activation rate the summary reports
_FREQUENT_SHARE = 0.1


@dataclass(frozen=True)
class LayerSparsity:
    """The sparsity of one FFN layer, summarised over all profiled tokens.

    Attributes:
        index: layer number (encoder first for encoder-decoder models).
        name: module path of the FFN.
        d_ff: F, the number of neurons.
        tokens: tokens seen.
        rms: root mean square of h over all tokens and neurons.
        exact_zero_fraction: fraction of h that is exactly 0.
        below_rms_fraction: ``{t: fraction of |h| < t * rms}`` for the config's rms_thresholds
            (to within one histogram bin, see ``moefy.profiling.accumulators``).
        contribution_fraction: ``{p: mean over tokens of the fraction of neurons in the smallest
            set carrying share p of sum(|h_i| * ||W_down[:, i]||)}``.
        active_fraction: mean over tokens of the fraction of active neurons (config rule).
        chunk_union_fraction: ``{n: mean over chunks of n consecutive tokens of the fraction of
            neurons active for at least one of them}``; ``None`` when the blocks are shorter
            than n.
        hot_fraction: fraction of neurons (the most frequently active) that carries
            ``hot_share`` of all activations.
        never_active: neurons never active.
        hot_neurons: ids of the most frequently active neurons, most frequent first.
        frequent_rate: mean activation rate (share of tokens for which a neuron is among the
            ``top_share`` largest |h|) of the 10 % of neurons most often top; about
            ``top_share`` when every neuron is equally often top, up to 1 when a few always
            are. None for a profile without activation rates.
    """

    index: int
    name: str
    d_ff: int
    tokens: int
    rms: float
    exact_zero_fraction: float
    below_rms_fraction: dict[float, float]
    contribution_fraction: dict[float, float]
    active_fraction: float
    chunk_union_fraction: dict[int, float | None]
    hot_fraction: float
    never_active: int
    hot_neurons: tuple[int, ...]
    frequent_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (dict keys become strings)."""
        out = asdict(self)
        for key in ("below_rms_fraction", "contribution_fraction", "chunk_union_fraction"):
            out[key] = {f"{k:g}": v for k, v in out[key].items()}
        out["hot_neurons"] = list(self.hot_neurons)
        return out


def summarise(
    index: int, name: str, sums: dict[str, torch.Tensor], config: ProfileConfig
) -> LayerSparsity:
    """One layer's summary from its accumulated sums (see ``LayerAccumulator``)."""
    F = sums["firing_counts"].numel()
    tokens = float(sums["tokens"])
    values = max(tokens * F, 1.0)
    rms = math.sqrt(float(sums["sum_squares"]) / values)
    counts = torch.arange(F + 1, dtype=torch.float64)
    active_mean = float((counts * sums["active_count_histogram"]).sum()) / max(tokens, 1.0)
    chunk_union: dict[int, float | None] = {}
    for n, union, chunks in zip(
        config.chunk_sizes, sums["chunk_union"].tolist(), sums["chunk_count"].tolist(), strict=True
    ):
        chunk_union[n] = union / (chunks * F) if chunks > 0 else None
    firing = sums["firing_counts"]  # (F,)
    order = torch.sort(firing, descending=True, stable=True).indices  # (F,)
    cumulative = firing[order].cumsum(0)  # (F,), exact: sums of whole numbers in float64
    total = float(cumulative[-1])
    if total > 0:
        target = torch.tensor([config.hot_share * total], dtype=torch.float64)
        hot_fraction = (int(torch.searchsorted(cumulative, target).item()) + 1) / F
    else:
        hot_fraction = 0.0
    hot = [int(i) for i in order[: config.num_hot] if firing[i] > 0]
    frequent_rate = None
    if "top_counts" in sums:
        frequent = max(1, round(_FREQUENT_SHARE * F))
        most_often = torch.topk(sums["top_counts"], frequent).values  # (frequent,)
        frequent_rate = float(most_often.mean()) / max(tokens, 1.0)
    return LayerSparsity(
        index=index,
        name=name,
        d_ff=F,
        tokens=int(tokens),
        rms=rms,
        exact_zero_fraction=float(sums["exact_zeros"]) / values,
        below_rms_fraction={
            t: fraction_below(sums["abs_histogram"], t * rms) for t in config.rms_thresholds
        },
        contribution_fraction={
            p: float(needed) / values
            for p, needed in zip(config.shares, sums["contribution_needed"].tolist(), strict=True)
        },
        active_fraction=active_mean / F,
        chunk_union_fraction=chunk_union,
        hot_fraction=hot_fraction,
        never_active=int((firing == 0).sum()),
        hot_neurons=tuple(hot),
        frequent_rate=frequent_rate,
    )


def table_rows(layers: list[LayerSparsity], config: ProfileConfig) -> list[dict[str, object]]:
    """One row per layer for a printed table (percentages).

    Columns: layer, zero % (exact zeros), neurons carrying 50/90/99 % of the contribution
    mass (the shares measured), mean active %, union % over chunks of 16 tokens (or the
    largest chunk size), the share of neurons carrying ``hot_share`` of all activations, and
    the mean activation rate of the 10 % most often top neurons (``-`` without rates).

    Example:
        >>> table_rows(profile.layers, profile.config)[0]["active %"]
    """
    shares = [p for p in _TABLE_SHARES if p in config.shares] or list(config.shares)
    sizes = config.chunk_sizes
    chunk = _TABLE_CHUNK if _TABLE_CHUNK in sizes else max(sizes)
    rows = []
    for layer in layers:
        row: dict[str, object] = {
            "layer": layer.index,
            "zero %": _PERCENT * layer.exact_zero_fraction,
        }
        for p in shares:
            row[f"p{_PERCENT * p:g} neurons %"] = _PERCENT * layer.contribution_fraction[p]
        row["active %"] = _PERCENT * layer.active_fraction
        union = layer.chunk_union_fraction[chunk]
        row[f"chunk{chunk} union %"] = "-" if union is None else _PERCENT * union
        row[f"hot{_PERCENT * config.hot_share:g} neurons %"] = _PERCENT * layer.hot_fraction
        rate = layer.frequent_rate
        row[f"freq{_PERCENT * _FREQUENT_SHARE:g} rate %"] = "-" if rate is None else _PERCENT * rate
        rows.append(row)
    return rows
