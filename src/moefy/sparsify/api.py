"""The verb ``sparsify_`` and the honest measurement of what the wrappers skipped.

``sparsify_`` reports what calibration decided (per-wrapper targets and thresholds).
``measure`` / ``measured_sparsity`` report what the wrappers actually did on the text they ran
on: the share of weight reads a kernel skips, per wrapper, per block and in total. Only the
latter is a figure to publish.

Shape legend:
    W: sparse wrappers in the model
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.dist import all_reduce_sum_
from moefy.errors import MoefyError
from moefy.sparsify.calibrate import stream_ffns
from moefy.sparsify.config import SparsifyConfig
from moefy.sparsify.methods import Allocation, Calibration, handler_for
from moefy.sparsify.wrappers import (
    SPARSIFY_CONFIG_ATTR,
    counters_paused,
    reset_counters,
    sparse_modules,
    unsparsify,
)


@dataclass
class SparsifyReport:
    """What ``sparsify_`` did.

    Attributes:
        config: the config applied.
        allocations: one per wrapper: its target share and threshold.
        calibration: reusable statistics (pass to ``sparsify_(..., calibration=...)`` to try
            another sparsity of the same method without the dense pass and greedy search
            again), or None.
        n_calibration_tokens: tokens of calibration text used (0 when none were needed).
        seconds: wall time of the call.
    """

    config: SparsifyConfig
    allocations: list[Allocation]
    calibration: Calibration | None
    n_calibration_tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the calibration statistics are left out)."""
        return {
            "config": self.config.to_dict(),
            "allocations": [asdict(a) for a in self.allocations],
            "n_calibration_tokens": self.n_calibration_tokens,
            "seconds": self.seconds,
        }


def check_calibration_text(
    config: SparsifyConfig, data: TokenBlocks | None, *, option: str | None = None
) -> None:
    """Refuse calibration text shorter than ``config.min_calibration_tokens`` (a cheap check to
    run before any expensive pass; :func:`sparsify_` runs it too). ``option`` is the CLI option
    the error message tells the user to raise; None (Python callers) names the config field.

    Raises:
        MoefyError: ``data`` has fewer tokens than the method needs.
    """
    if not config.needs_calibration or data is None:
        return
    if data.n_tokens < config.min_calibration_tokens:
        raise MoefyError(
            f"calibration text has {data.n_tokens} tokens, fewer than the "
            f"{config.min_calibration_tokens} {config.method} needs: "
            + (
                "give more calibration text or lower min_calibration_tokens"
                if option is None
                else f"give more text ({option})"
            )
        )


def check_method(model: nn.Module, config: SparsifyConfig) -> None:
    """Refuse a method the model cannot take before any expensive pass: the method's wrappers
    are installed and taken out again (the model's own modules return), so structural errors
    (a rank above a layer's, a projection that cannot be rotated, a FFN without a gate) come
    first. The CLI calls it before the dense evaluation.

    Raises:
        MoefyError: what ``sparsify_`` would refuse about the model's structure.

    Example:
        >>> check_method(model, LowRankConfig(rank=10_000))
        MoefyError: lowrank: rank 10000 exceeds ...
    """
    from moefy.arch.spec import set_submodule

    if next(sparse_modules(model), None) is not None:
        raise MoefyError("the model is sparsified already: call unsparsify(model) first")
    wrapped = handler_for(config).install(model, config)
    for path, wrapper in reversed(wrapped):
        set_submodule(model, path, wrapper.base_layer)


def sparsify_(
    model: nn.Module,
    config: SparsifyConfig,
    data: TokenBlocks | None = None,
    *,
    calibration: Calibration | None = None,
    progress: bool = False,
) -> SparsifyReport:
    """Sparsify the activations of ``model`` in place with a training-free method.

    Swaps sparse wrappers into the targeted modules (linear layers or the gate activation), then
    sets their thresholds from calibration text. Under ``torchrun`` every rank calibrates on its
    shard and the statistics are all-reduced, so the thresholds equal a single-process run.

    Args:
        model: a supported model (see ``moefy.arch``), dense.
        config: the config of a registered method (``TEALConfig``, ...; each lives in its
            module of :mod:`moefy.sparsify.methods`); its type picks the handler.
        data: calibration text (``load_text(...).blocks(tokenizer, "calibration")``); top-k needs
            none.
        calibration: statistics from an earlier report of the same method on the same model:
            skips the dense pass and, for lower targets, the greedy search; the refinement passes
            (``calibration_passes - 1``) still stream ``data`` when it is given.
        progress: show progress bars.

    Returns:
        A :class:`SparsifyReport`; measure the real sparsity with :func:`measure`.

    Raises:
        MoefyError: a sparsified model, a method the architecture cannot take (CATS/CHESS on a
            non-gated FFN), missing or too-short calibration text.

    Example:
        >>> blocks = load_text("bbc-news").blocks(tokenizer, "calibration", n_tokens=16384)
        >>> report = sparsify_(model, TEALConfig(sparsity=0.5), blocks)
        >>> measure(model, eval_blocks).total
        0.49...
    """
    start = time.perf_counter()
    if not isinstance(config, SparsifyConfig):
        raise MoefyError(f"config must be a sparsify config such as TEALConfig, got {config!r}")
    handler = handler_for(config)
    if next(sparse_modules(model), None) is not None:
        raise MoefyError("the model is sparsified already: call unsparsify(model) first")
    if config.needs_calibration and data is None and calibration is None:
        raise MoefyError(f"{config.method} needs calibration text: pass data=TokenBlocks")
    check_calibration_text(config, data)
    was_training = model.training
    model.eval()
    wrapped = handler.install(model, config)
    try:
        with counters_paused():  # reset below: counting would only slow the passes down
            allocations, calibration_out = handler.calibrate(
                model, wrapped, config, data, calibration, progress
            )
    except BaseException:
        unsparsify(model)
        raise
    finally:
        model.train(was_training)
    reset_counters(model)
    setattr(model, SPARSIFY_CONFIG_ATTR, config)
    streamed = data.n_tokens if config.needs_calibration and data is not None else 0
    return SparsifyReport(
        config=config,
        allocations=allocations,
        calibration=calibration_out,
        n_calibration_tokens=streamed,
        seconds=time.perf_counter() - start,
    )


def sparsify_config_of(model: nn.Module) -> SparsifyConfig | None:
    """The config ``model`` was sparsified with, or None for a dense model."""
    return getattr(model, SPARSIFY_CONFIG_ATTR, None)


# ---------------------------------------------------------------------------------------------
# measurement


@dataclass(frozen=True)
class ModuleSparsity:
    """What one wrapper skipped.

    Attributes:
        path: dotted path of the wrapper.
        layer: block index.
        role: what it sparsifies.
        activation_sparsity: share of the entries it passed on that were zero.
        weight_sparsity: share of its scope's weight reads (per token) a kernel skips.
        scope_weights: dense weight entries per token it accounts for.
        tokens: tokens it saw.
    """

    path: str
    layer: int
    role: str
    activation_sparsity: float
    weight_sparsity: float
    scope_weights: int
    tokens: int


@dataclass(frozen=True)
class LayerSparsity:
    """What the wrappers of one block skipped, together.

    Attributes:
        layer: block index.
        weight_sparsity: share of the block's targeted weight reads skipped.
        activation_sparsity: share of zero entries over the block's sparsified tensors.
    """

    layer: int
    weight_sparsity: float
    activation_sparsity: float


@dataclass(frozen=True)
class SparsityMeasurement:
    """Measured sparsity: the share of weight reads skipped on the text the model ran on.

    Attributes:
        modules: per wrapper.
        layers: per block.
        total: share of weight reads skipped over every targeted weight (FFN, plus attention
            projections where targeted), token-weighted.
        activation_sparsity: share of zero entries over all sparsified tensors.
        n_tokens: tokens seen by the first wrapper.
    """

    modules: tuple[ModuleSparsity, ...]
    layers: tuple[LayerSparsity, ...]
    total: float
    activation_sparsity: float
    n_tokens: int

    def table_rows(self) -> list[dict[str, object]]:
        """One row per block plus a total row, for a printed table."""
        rows: list[dict[str, object]] = [
            {
                "layer": str(layer.layer),
                "weights skipped %": 100 * layer.weight_sparsity,
                "zero activations %": 100 * layer.activation_sparsity,
            }
            for layer in self.layers
        ]
        rows.append(
            {
                "layer": "total",
                "weights skipped %": 100 * self.total,
                "zero activations %": 100 * self.activation_sparsity,
            }
        )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def measured_sparsity(model: nn.Module) -> SparsityMeasurement:
    """Read the wrappers' counters (summed over ranks: call on every rank) since the last reset.

    Example:
        >>> reset_counters(model); perplexity(model, eval_blocks); measured_sparsity(model).total
    """
    wrapped = list(sparse_modules(model))
    if not wrapped:
        raise MoefyError("the model has no sparse wrappers: call sparsify_ first")
    counters = torch.stack(
        [torch.stack([w.zeros_seen, w.entries_seen, w.tokens_seen]) for _, w in wrapped]
    )  # (W, 3) int64
    counters = all_reduce_sum_(counters).cpu().double()
    modules = []
    by_layer: dict[int, list[float]] = {}
    for (path, wrapper), (zeros, entries, tokens) in zip(wrapped, counters.tolist(), strict=True):
        skipped = zeros * wrapper.weights_per_zero
        dense = tokens * wrapper.scope_weights
        modules.append(
            ModuleSparsity(
                path=path,
                layer=wrapper.layer,
                role=wrapper.role,
                activation_sparsity=_ratio(zeros, entries),
                weight_sparsity=_ratio(skipped, dense),
                scope_weights=wrapper.scope_weights,
                tokens=int(tokens),
            )
        )
        sums = by_layer.setdefault(wrapper.layer, [0.0, 0.0, 0.0, 0.0])
        for k, value in enumerate((skipped, dense, zeros, entries)):
            sums[k] += value
    layers = tuple(
        LayerSparsity(
            layer=layer, weight_sparsity=_ratio(s[0], s[1]), activation_sparsity=_ratio(s[2], s[3])
        )
        for layer, s in sorted(by_layer.items())
    )
    totals = [sum(s[k] for s in by_layer.values()) for k in range(4)]
    return SparsityMeasurement(
        modules=tuple(modules),
        layers=layers,
        total=_ratio(totals[0], totals[1]),
        activation_sparsity=_ratio(totals[2], totals[3]),
        n_tokens=modules[0].tokens,
    )


def measure(
    model: nn.Module, data: TokenBlocks, batch_size: int = 8, progress: bool = False
) -> SparsityMeasurement:
    """Run ``data`` (evaluation text) through a sparsified model and report what was skipped.

    Resets the counters first; under ``torchrun`` each rank runs its shard and the counts are
    summed. The forward stops after the last block (the LM head does not change the counts).

    Args:
        model: a model changed by ``sparsify_`` or loaded by ``load_sparse``.
        data: the text to measure on.
        batch_size: blocks per forward pass.
        progress: show a progress bar.

    Returns:
        The measured :class:`SparsityMeasurement`.

    Example:
        >>> m = measure(model, load_text("bbc-news").blocks(tokenizer, "evaluation", n_tokens=8192))
        >>> [round(layer.weight_sparsity, 2) for layer in m.layers][:3]
        [0.5, 0.49, 0.51]
    """
    if batch_size < 1:
        raise MoefyError(f"batch size must be >= 1, got {batch_size}")
    if next(sparse_modules(model), None) is None:
        raise MoefyError("the model has no sparse wrappers: call sparsify_ first")
    reset_counters(model)
    was_training = model.training
    model.eval()
    try:
        stream_ffns(
            model,
            data,
            batch_size,
            desc="measuring",
            progress=progress,
        )
    finally:
        model.train(was_training)
    return measured_sparsity(model)
