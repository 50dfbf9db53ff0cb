"""Centring (SCAP): subtract a calibrated per-channel centre before sparsifying a layer's input.

The inputs of a linear layer are often not centred on zero: after a norm layer each channel has
its own offset, and ``SiLU(g) * u`` piles up slightly off zero. A magnitude threshold then drops
entries near zero, not entries near the channel's typical value. SCAP (arXiv 2412.07174)
thresholds ``x - c`` instead, ``c`` the mode of each input channel on calibration text, and adds
``W @ c`` back as a bias, so ``W x + b = W (x - c) + (W c + b)`` stays the same computation:

    y = W s(x - c) + b + W c,    s zeroes entries with |x_i - c_i| <= threshold_i

An entry equal to its channel's centre costs nothing, as a zero does without centring. The
wrappers here subclass the plain ones, so calibration (histograms of what ``observe`` hands
over: the centred input), the greedy allocation and the decode kernel work unchanged.

The centre is estimated from two streamed passes with fixed-size accumulators: per-channel
moments (on the first ``MOMENT_TOKENS`` tokens: they only place the bins), then a per-channel
histogram of ``MODE_BINS`` bins over ``mean +- MODE_RANGE_STDS``
standard deviations (plus under- and overflow bins). The mode is the centre of the densest
window of the histogram smoothed twice by a box of the kernel-density bandwidth
(Silverman's rule on a robust scale), refined by a parabola through its neighbours; the median
is read off the cumulative counts. Both are exact to a fraction of a bin (``8 / 256`` of a
standard deviation).

Shape legend:
    N: tokens, C / I: input channels of a linear layer, O: its output features,
    B: histogram bins per channel (``MODE_BINS``, plus 2 for under- and overflow)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from moefy import kernels
from moefy.data.blocks import TokenBlocks
from moefy.device import model_device
from moefy.dist import all_reduce_sum_
from moefy.errors import MoefyError
from moefy.sparsify.calibrate import observing, stream_ffns
from moefy.sparsify.config import CENTRES, DEFAULT_BATCH_SIZE, DEFAULT_GREEDY_SINK_POSITIONS
from moefy.sparsify.wrappers import SparseModule, ThresholdLinear, TopKLinear

__all__ = [
    "CENTRES",
    "CentredThresholdLinear",
    "CentredTopKLinear",
    "ChannelHistogram",
    "ChannelMoments",
    "centre_wrappers",
    "fit_centres",
    "threshold_wrapper_class",
]

MODE_BINS = 256
MODE_RANGE_STDS = 4.0
# Tokens the first pass (moments: only the histogram's range) reads at most; the histogram pass
# reads them all. The range needs no more: a channel's values beyond it land in the under- and
# overflow bins, which the median counts and the mode never is.
MOMENT_TOKENS = 4096
# Silverman's rule of thumb for a Gaussian kernel: h = 0.9 * min(std, IQR / 1.34) * n ** -0.2
_SILVERMAN = 0.9
_IQR_PER_STD = 1.34
# Two passes of a box of half-width a have the variance 2 a**2 / 3 of a Gaussian kernel of
# bandwidth h when a = h * sqrt(3 / 2).
_BOX_PER_BANDWIDTH = math.sqrt(1.5)


# ---------------------------------------------------------------------------------------------
# the wrappers


def _weight_oi(layer: nn.Module) -> torch.Tensor:
    """(O, I) weight of a Linear, or of a GPT-2 Conv1D (stored (I, O))."""
    weight = layer.weight.detach()
    return weight if isinstance(layer, nn.Linear) else weight.t()


class _Centred:
    """The centre buffers and what every centred wrapper does with them (a mixin placed before a
    :class:`moefy.sparsify.wrappers._InputSparseLinear` subclass)."""

    in_features: int
    out_features: int
    base_layer: nn.Module
    centre: torch.Tensor
    centre_bias: torch.Tensor

    def _register_centre(self) -> None:
        # zeros: the wrapper computes what its base layer does until fit_centres sets them
        like = {"dtype": torch.float32, "device": model_device(self.base_layer)}
        self.register_buffer("centre", torch.zeros(self.in_features, **like))
        self.register_buffer("centre_bias", torch.zeros(self.out_features, **like))

    def set_centre(self, centre: torch.Tensor) -> None:
        """Set the (I,) centre and the (O,) bias ``W @ centre`` it moves out of the product."""
        with torch.no_grad():
            weight = _weight_oi(self.base_layer).double()  # (O, I)
            centre = centre.detach().to(device=weight.device, dtype=torch.float64)
            self.centre.copy_(centre)
            self.centre_bias.copy_(weight @ centre)  # (O,)

    def _centred(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.centre.to(x.dtype)  # (..., I)

    def observe(self, callback: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """Call ``callback`` with the centred input ``x - centre`` (what is sparsified)."""

        def _hook(_module: nn.Module, args: tuple) -> None:
            callback(self._centred(args[0]))  # returns None: the input stays as it is

        return self.register_forward_pre_hook(_hook)  # type: ignore[attr-defined]


class CentredThresholdLinear(_Centred, ThresholdLinear):
    """Zero ``x_i - c_i`` when ``|x_i - c_i| <= threshold_i``, apply the layer, add ``W @ c``.

    With every threshold zero the wrapper runs its base layer on ``x`` itself, so a dense
    calibration step (and sparsity 0) gives the dense model bit for bit; it still counts the
    entries equal to their centre as skipped, as a kernel would skip them.

    Attributes:
        centre: (I,) buffer, the per-channel centre ``c`` (zeros until calibrated).
        centre_bias: (O,) buffer, ``W @ c``.
        threshold: as :class:`ThresholdLinear`, on ``|x - c|``.

    Example:
        >>> layer = CentredThresholdLinear(nn.Linear(8, 4), layer=0, role="up_proj")
        >>> layer.set_centre(torch.full((8,), 0.1)); layer.threshold.fill_(0.5)
    """

    def __init__(
        self, base_layer: nn.Module, *, layer: int, role: str, per_channel: bool = False
    ) -> None:
        super().__init__(base_layer, layer=layer, role=role, per_channel=per_channel)
        self._register_centre()
        # the frozen answer of "every threshold is zero" for compiled calls (None: not frozen)
        self._frozen_dense: bool | None = None
        self._dense_cache: tuple[tuple, bool] | None = None  # (threshold's key, answer)

    def freeze_for_compile(self) -> None:
        """As :meth:`ThresholdLinear.freeze_for_compile`, and freeze the dense shortcut."""
        super().freeze_for_compile()
        self._frozen_dense = not bool(self.threshold.any())

    def _dense(self) -> bool:
        """Whether every threshold is zero; remembered until the threshold buffer changes."""
        if torch.compiler.is_compiling():
            return bool(self._frozen_dense)
        threshold = self.threshold
        key = (threshold.data_ptr(), threshold._version, threshold.device)
        if self._dense_cache is None or self._dense_cache[0] != key:
            self._dense_cache = (key, not bool(threshold.any()))
        return self._dense_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = self._centred(x)  # (..., I)
        if self._dense():
            self._count(centred)  # entries at their centre: what a kernel would skip
            return self.base_layer(x)  # (..., O), exactly the dense layer
        tokens = centred.reshape(-1, self.in_features)  # (N, I)
        weight_t = self._kernel_weight(tokens)  # (I, O) or None
        centre_bias = self.centre_bias.to(x.dtype)  # (O,)
        if weight_t is None:
            sparse = self.sparsify_input(centred)  # (..., I)
            self._count(sparse)
            return self.base_layer(sparse) + centre_bias  # (..., O)
        bias = centre_bias if self.bias is None else self.bias + centre_bias
        counter = self._kernel_counter(tokens)
        out = kernels.threshold_linear(tokens, weight_t, bias, self.threshold, counter)
        return out.reshape(*x.shape[:-1], self.out_features)  # (..., O)


class CentredTopKLinear(_Centred, TopKLinear):
    """Keep the ``k`` entries of ``x - c`` largest in magnitude per token, add ``W @ c`` back.

    With ``k`` the full width the base layer runs on ``x`` itself (the dense model exactly).

    Example:
        >>> layer = CentredTopKLinear(nn.Linear(64, 8), layer=0, role="down_proj", k=16)
        >>> layer.set_centre(torch.full((64,), -0.02))
    """

    def __init__(self, base_layer: nn.Module, *, layer: int, role: str, k: int) -> None:
        super().__init__(base_layer, layer=layer, role=role, k=k)
        self._register_centre()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = self._centred(x)  # (..., I)
        if self.k >= self.in_features:
            self._count(centred)
            return self.base_layer(x)  # (..., O)
        sparse = self.sparsify_input(centred)  # (..., I)
        self._count(sparse)
        return self.base_layer(sparse) + self.centre_bias.to(x.dtype)  # (..., O)


def threshold_wrapper_class(centre: str) -> type[ThresholdLinear]:
    """The threshold wrapper a layerwise method installs for its ``centre`` setting."""
    return ThresholdLinear if centre == "none" else CentredThresholdLinear


# ---------------------------------------------------------------------------------------------
# the estimators: fixed-size per-channel accumulators


def _rows(values: torch.Tensor, sink_positions: int) -> torch.Tensor:
    """(N, C) float32 rows of a (..., C) tensor, leaving out the first ``sink_positions``
    positions of each (B, T, C) block (attention sinks are outliers)."""
    if values.dim() >= 3 and values.shape[1] > sink_positions:
        values = values[:, sink_positions:]
    return values.detach().reshape(-1, values.shape[-1]).float()


class ChannelMoments:
    """Streamed count, sum and sum of squares of every channel.

    Example:
        >>> moments = ChannelMoments(3); moments.add(torch.randn(100, 3))
        >>> moments.mean().shape
        torch.Size([3])
    """

    def __init__(self, channels: int, device: torch.device | str | None = None) -> None:
        self.sums = torch.zeros(3, channels, dtype=torch.float64, device=device)  # (3, C)

    def add(self, rows: torch.Tensor) -> None:
        """Count (N, C) rows."""
        rows = rows.double()
        self.sums[0] += rows.shape[0]
        self.sums[1] += rows.sum(dim=0)
        self.sums[2] += (rows * rows).sum(dim=0)

    def count(self) -> torch.Tensor:
        """(C,) rows counted."""
        return self.sums[0]

    def mean(self) -> torch.Tensor:
        """(C,) float64 means."""
        return self.sums[1] / self.sums[0].clamp_min(1.0)

    def std(self) -> torch.Tensor:
        """(C,) float64 standard deviations."""
        variance = self.sums[2] / self.sums[0].clamp_min(1.0) - self.mean() ** 2
        return variance.clamp_min(0.0).sqrt()


class ChannelHistogram:
    """Streamed histogram of every channel over ``mean +- MODE_RANGE_STDS`` std, with under-
    and overflow bins; gives the channel's mode and median.

    Args:
        mean, std: (C,) the channel's moments (from a first pass, :class:`ChannelMoments`).
        bins: interior bins per channel.

    Example:
        >>> values = torch.randn(10_000, 2) + torch.tensor([1.0, -2.0])
        >>> hist = ChannelHistogram(values.mean(0), values.std(0)); hist.add(values)
        >>> hist.mode()  # close to [1, -2]
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, bins: int = MODE_BINS) -> None:
        mean, std = mean.double(), std.double()
        span = 2.0 * MODE_RANGE_STDS * std
        # a constant channel still gets a (tiny) bin width, so every value has a bin
        tiny = torch.finfo(torch.float32).eps * mean.abs().clamp_min(1.0)
        self.bins = bins
        self.width = torch.maximum(span / bins, tiny)  # (C,)
        self.low = mean - self.width * bins / 2  # (C,)
        self.counts = torch.zeros(len(mean), bins + 2, dtype=torch.float64, device=mean.device)

    def add(self, rows: torch.Tensor) -> None:
        """Count (N, C) rows."""
        channels = self.counts.shape[0]
        position = (rows.double() - self.low) / self.width  # (N, C), in bins
        index = position.floor().nan_to_num(nan=-1.0).clamp(-1, self.bins).long() + 1
        flat = index + torch.arange(channels, device=rows.device) * (self.bins + 2)  # (N, C)
        counted = torch.bincount(flat.reshape(-1), minlength=channels * (self.bins + 2))
        self.counts += counted.view(channels, self.bins + 2).to(self.counts)

    def _value_at(self, bin_position: torch.Tensor) -> torch.Tensor:
        """(C,) values at (C,) fractional positions in interior-bin units."""
        return self.low + bin_position * self.width

    def quantile(self, share: float) -> torch.Tensor:
        """(C,) per-channel quantiles, linear inside a bin (clamped to the histogram's range)."""
        cumulative = self.counts.cumsum(dim=1)  # (C, B + 2)
        target = share * cumulative[:, -1:]  # (C, 1)
        index = torch.searchsorted(cumulative, target).clamp(1, self.bins)  # (C, 1) interior
        below = cumulative.gather(1, index - 1)
        inside = self.counts.gather(1, index).clamp_min(1.0)
        fraction = ((target - below) / inside).clamp(0.0, 1.0)
        return self._value_at((index - 1 + fraction).squeeze(1))

    def median(self) -> torch.Tensor:
        """(C,) per-channel medians."""
        return self.quantile(0.5)

    def mode(self) -> torch.Tensor:
        """(C,) per-channel modes: the densest window of the kernel-density bandwidth."""
        interior = self.counts[:, 1:-1]  # (C, B)
        n = self.counts.sum(dim=1).clamp_min(1.0)
        iqr = self.quantile(0.75) - self.quantile(0.25)
        std = (self.width * self.bins) / (2.0 * MODE_RANGE_STDS)
        scale = torch.minimum(std, iqr / _IQR_PER_STD)
        scale = torch.where(scale > 0, scale, std)
        bandwidth = _SILVERMAN * scale * n.pow(-0.2)  # (C,)
        half = (_BOX_PER_BANDWIDTH * bandwidth / self.width).round().clamp(1, self.bins // 4)
        density = _box_smooth(_box_smooth(interior, half.long()), half.long())  # (C, B)
        peak = density.argmax(dim=1, keepdim=True)  # (C, 1)
        left = density.gather(1, (peak - 1).clamp_min(0))
        middle = density.gather(1, peak)
        right = density.gather(1, (peak + 1).clamp_max(self.bins - 1))
        curvature = left - 2 * middle + right
        offset = torch.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0)
        offset = offset.clamp(-0.5, 0.5)
        return self._value_at((peak + 0.5 + offset).squeeze(1))


def _box_smooth(counts: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """(C, B) sums of ``counts`` over the window ``[b - half_c, b + half_c]`` of each bin
    (truncated at the edges), for a (C,) integer half-width per channel."""
    channels, bins = counts.shape
    cumulative = torch.nn.functional.pad(counts.cumsum(dim=1), (1, 0))  # (C, B + 1)
    position = torch.arange(bins, device=counts.device)  # (B,)
    upper = (position + half[:, None] + 1).clamp_max(bins)  # (C, B)
    lower = (position - half[:, None]).clamp_min(0)
    return cumulative.gather(1, upper) - cumulative.gather(1, lower)


# ---------------------------------------------------------------------------------------------
# fitting the wrappers' centres on calibration text


def _stream_into(
    model: nn.Module,
    wrappers: Sequence[SparseModule],
    adders: Sequence[Callable[[torch.Tensor], None]],
    data: TokenBlocks,
    batch_size: int,
    sink_positions: int,
    progress: bool,
) -> None:

    callbacks = [lambda values, add=add: add(_rows(values, sink_positions)) for add in adders]
    with observing(wrappers, callbacks):
        stream_ffns(
            model,
            data,
            batch_size,
            desc="centring",
            progress=progress,
        )


def fit_centres(
    model: nn.Module,
    wrappers: Sequence[SparseModule],
    data: TokenBlocks,
    *,
    centre: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    sink_positions: int = DEFAULT_GREEDY_SINK_POSITIONS,
    progress: bool = False,
) -> list[torch.Tensor]:
    """The (C,) centre of each wrapper's input on ``data`` (summed over ranks).

    The wrappers' own centres are reset to zero first, so they observe the raw input.

    Args:
        model: the model holding ``wrappers`` (centred wrappers with zero thresholds).
        wrappers: :class:`CentredThresholdLinear` / :class:`CentredTopKLinear` modules.
        data: calibration text.
        centre: ``"mode"``, ``"median"`` or ``"mean"``.
        batch_size: blocks per forward pass.
        sink_positions: leading positions of each block left out.
        progress: show a progress bar.

    Returns:
        One (C,) float32 centre per wrapper, on the model's device.

    Example:
        >>> centres = fit_centres(model, [w for _, w in wrapped], blocks, centre="mode")
    """
    if centre not in CENTRES or centre == "none":
        raise MoefyError(f"centre must be one of mode, median, mean, got {centre!r}")
    for wrapper in wrappers:
        wrapper.set_centre(torch.zeros_like(wrapper.centre))
    device = wrappers[0].centre.device if wrappers else None
    moments = [ChannelMoments(w.in_features, device) for w in wrappers]
    first = data if centre == "mean" else _leading(data, MOMENT_TOKENS)
    _stream_into(
        model, wrappers, [m.add for m in moments], first, batch_size, sink_positions, progress
    )
    for m in moments:
        all_reduce_sum_(m.sums)
    if centre == "mean":
        return [m.mean().float() for m in moments]
    histograms = [ChannelHistogram(m.mean(), m.std()) for m in moments]
    _stream_into(
        model, wrappers, [h.add for h in histograms], data, batch_size, sink_positions, progress
    )
    for h in histograms:
        all_reduce_sum_(h.counts)
    return [(h.mode() if centre == "mode" else h.median()).float() for h in histograms]


def _leading(data: TokenBlocks, tokens: int) -> TokenBlocks:
    """The first blocks of ``data`` holding at least ``tokens`` tokens (all of it if fewer)."""
    blocks = max(1, math.ceil(tokens / data.block_len))
    return data if blocks >= data.num_blocks else replace(data, input_ids=data.input_ids[:blocks])


def centre_wrappers(
    model: nn.Module,
    wrapped: Sequence[tuple[str, SparseModule]],
    config: object,
    data: TokenBlocks | None,
    progress: bool,
) -> dict[str, dict[str, torch.Tensor]]:
    """Fit and set the centres of a centred config's wrappers; return them as
    ``path -> {"centre": (I,), "centre_bias": (O,)}`` (nothing for ``centre="none"``).

    Reads ``centre`` and, where the config has them, ``batch_size`` and
    ``greedy_sink_positions`` from ``config``.

    Raises:
        MoefyError: a centred config without calibration text.
    """
    centre = getattr(config, "centre", "none")
    if centre == "none":
        return {}
    method = getattr(config, "method", "this method")
    if data is None:
        raise MoefyError(
            f"{method} with centre={centre!r} estimates each channel's {centre} on calibration "
            "text: pass data=TokenBlocks (or give --data), or use centre='none'"
        )
    centres = fit_centres(
        model,
        [wrapper for _, wrapper in wrapped],
        data,
        centre=centre,
        batch_size=getattr(config, "batch_size", DEFAULT_BATCH_SIZE),
        sink_positions=getattr(config, "greedy_sink_positions", DEFAULT_GREEDY_SINK_POSITIONS),
        progress=progress,
    )
    buffers = {}
    for (path, wrapper), value in zip(wrapped, centres, strict=True):
        wrapper.set_centre(value)
        buffers[path] = {
            "centre": wrapper.centre.clone(),
            "centre_bias": wrapper.centre_bias.clone(),
        }
    return buffers
