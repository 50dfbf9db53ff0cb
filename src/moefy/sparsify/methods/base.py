"""What every training-free method shares: the handler interface, calibration statistics, the
threshold calibration (a histogram of a criterion, then quantiles) and the layerwise install and
greedy allocation of TEAL-like methods.

A handler does two things: ``install`` swaps sparse wrappers (with zero thresholds) into the model
— the structure only, which is also how a saved model is rebuilt before its state dict is loaded —
and ``calibrate`` sets their thresholds from calibration text. Torch and the model code are
imported inside the functions that use them, so that the CLI can read the registered methods
without importing torch.

Shape legend:
    C: channels of a sparsified tensor, H: histogram bins, S: greedy steps, W: wrappers of a block
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moefy.errors import MoefyError
from moefy.sparsify.config import CalibratedConfig, LayerwiseConfig, SparsifyConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from moefy.arch import FFNSite
    from moefy.data.blocks import TokenBlocks
    from moefy.sparsify.calibrate import BlockPlan
    from moefy.sparsify.wrappers import SparseModule

    Wrapped = list[tuple[str, SparseModule]]


@dataclass
class Calibration:
    """Statistics of one calibration run, reusable for other sparsity levels of the same method.

    Histograms and channel scales do not depend on the target; the greedy trajectories hold every
    step up to ``greedy_reach``, so any lower target is read off them (as TEAL's lookup tables).

    Attributes:
        method: the config's ``method``.
        settings: config fields the statistics depend on (all but ``sparsity``).
        paths: wrapper paths, in order.
        histograms: (H,) criterion histogram per wrapper path.
        channel_scales: (C,) criterion weight per channel, per wrapper path (absent: 1).
        trajectories: greedy (S + 1, W) shares per block index (empty without greedy).
        trajectory_errors: (S + 1,) block error at each trajectory row, per block index
            (relative to the residual stream with ``budget="global"``).
        greedy_reach: the highest block sparsity the trajectories reach.
        n_tokens: calibration tokens streamed.
        buffers: what :meth:`_ThresholdHandler.prepare` fitted before the thresholds (rotations,
            centres, low-rank factors): wrapper path -> buffer name -> tensor, set again on
            another copy of the model when the calibration is reused.
    """

    method: str
    settings: dict
    paths: tuple[str, ...]
    histograms: dict[str, torch.Tensor]
    channel_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    trajectories: dict[int, torch.Tensor] = field(default_factory=dict)
    trajectory_errors: dict[int, torch.Tensor] = field(default_factory=dict)
    greedy_reach: float = 0.0
    n_tokens: int = 0
    buffers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Allocation:
    """What calibration decided for one wrapper.

    Attributes:
        path: the wrapper's dotted path.
        layer: block index.
        role: what it sparsifies (``down_proj``, ``act_fn``, ...).
        sparsity: the share of its entries it was calibrated to zero.
        criterion_threshold: the threshold on the method's criterion (None for top-k).
        calibration_sparsity: the share of calibration entries at or below the threshold (differs
            from ``sparsity`` only where exact zeros outnumber the target).
    """

    path: str
    layer: int
    role: str
    sparsity: float
    criterion_threshold: float | None
    calibration_sparsity: float | None


class MethodHandler:
    """Installs and calibrates one method's wrappers.

    Example:
        >>> class HalfHandler(MethodHandler):
        ...     def install(self, model, config): ...  # swap wrappers in, return (path, wrapper)
        ...     def calibrate(self, model, wrapped, config, data, calibration, progress): ...
    """

    def install(self, model: nn.Module, config: SparsifyConfig) -> Wrapped:
        """Swap the method's wrappers (zero thresholds) into ``model``; return them with paths."""
        raise NotImplementedError

    def calibrate(
        self,
        model: nn.Module,
        wrapped: Wrapped,
        config: SparsifyConfig,
        data: TokenBlocks | None,
        calibration: Calibration | None,
        progress: bool,
    ) -> tuple[list[Allocation], Calibration | None]:
        """Set the wrappers' thresholds; return what was decided and reusable statistics."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# helpers shared by the handlers


def swap(model: nn.Module, path: str, wrapper: SparseModule, wrapped: Wrapped) -> None:
    """Put ``wrapper`` at ``path`` in ``model`` and record it in ``wrapped``."""
    from moefy.arch.spec import set_submodule

    set_submodule(model, path, wrapper)
    wrapped.append((path, wrapper))


def ffn_weight_count(site: FFNSite) -> int:
    """Weight entries of one FFN (up, gate and down) read per token when dense."""
    weights = site.weights()
    gate = weights.w_gate.numel() if weights.w_gate is not None else 0
    return weights.w_up.numel() + gate + weights.w_down.numel()


def require_gated(site: FFNSite, model: nn.Module, method: str) -> None:
    """Refuse an FFN without a gate for a method that thresholds the gate activation."""
    from moefy.arch import model_type_of

    if not site.spec.gated:
        raise MoefyError(
            f"{method} thresholds the gate activation of gated FFNs, and {model_type_of(model)} "
            "FFNs have no gate: use teal, wina or topk for this model"
        )


def _settings(config: SparsifyConfig) -> dict:
    settings = config.to_dict()
    for name in (
        "sparsity",
        "batch_size",
        "min_calibration_tokens",
        "calibration_passes",
        "version",
    ):
        settings.pop(name, None)
    return settings


def load_buffers(wrapped: Wrapped, buffers: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy fitted buffers (``path -> {name: tensor}``, from :meth:`_ThresholdHandler.prepare`)
    into the wrappers at those paths."""
    import torch

    by_path = dict(wrapped)
    with torch.no_grad():
        for path, named in buffers.items():
            for name, tensor in named.items():
                getattr(by_path[path], name).copy_(tensor)


def _check_reuse(
    calibration: Calibration, config: CalibratedConfig, paths: tuple[str, ...]
) -> None:
    if calibration.method != config.method or calibration.settings != _settings(config):
        raise MoefyError(
            f"the calibration was made for {calibration.method} {calibration.settings}, not "
            f"{config.method} {_settings(config)}: calibrate again"
        )
    if calibration.paths != paths:
        raise MoefyError("the calibration was made for another model: calibrate again")


class _ThresholdHandler(MethodHandler):
    """Shared calibration of the threshold methods: histogram of a criterion, then quantiles."""

    per_channel = False

    def prepare(
        self,
        model: nn.Module,
        wrapped: Wrapped,
        config: SparsifyConfig,
        data: TokenBlocks,
        progress: bool,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Fit what the wrappers need before their thresholds are calibrated (a rotation, a
        centre, low-rank factors), set it in the wrappers' buffers and return it as
        ``path -> {buffer name: tensor}``, so that a reused :class:`Calibration` sets the same
        buffers on another copy of the model (:func:`load_buffers`). The histograms that follow
        read the wrappers with these buffers in place. Default: nothing to fit.
        """
        return {}

    def channel_scales(
        self,
        model: nn.Module,
        wrapped: Wrapped,
        config: SparsifyConfig,
        data: TokenBlocks,
        progress: bool,
    ) -> list[torch.Tensor | None]:
        """Per wrapper, the (C,) weight of each channel in the criterion, or None for 1."""
        return [None] * len(wrapped)

    def calibrate(
        self,
        model: nn.Module,
        wrapped: Wrapped,
        config: SparsifyConfig,
        data: TokenBlocks | None,
        calibration: Calibration | None,
        progress: bool,
    ) -> tuple[list[Allocation], Calibration | None]:
        paths = tuple(path for path, _ in wrapped)
        if calibration is not None:
            _check_reuse(calibration, config, paths)
            load_buffers(wrapped, calibration.buffers)
        else:
            calibration = self._first_pass(model, wrapped, config, data, progress)
        shares = self.allocate(model, wrapped, config, data, calibration, progress)
        histograms = self._set_thresholds(
            model, wrapped, config, data, calibration, shares, progress
        )
        scales = [calibration.channel_scales.get(path) for path in paths]
        return _allocations(wrapped, histograms, scales, shares), calibration

    def _first_pass(
        self,
        model: nn.Module,
        wrapped: Wrapped,
        config: SparsifyConfig,
        data: TokenBlocks | None,
        progress: bool,
    ) -> Calibration:
        """Histograms of the criterion on the dense model (and the channel scales)."""
        if data is None:
            raise MoefyError(
                f"{config.method} needs calibration text: pass data=TokenBlocks (or a "
                "calibration from an earlier report)"
            )
        paths = tuple(path for path, _ in wrapped)
        buffers = self.prepare(model, wrapped, config, data, progress)
        scales = self.channel_scales(model, wrapped, config, data, progress)
        histograms = _histograms(model, wrapped, scales, config, data, progress)
        return Calibration(
            buffers=buffers,
            method=config.method,
            settings=_settings(config),
            paths=paths,
            histograms=dict(zip(paths, histograms, strict=True)),
            channel_scales={p: s for p, s in zip(paths, scales, strict=True) if s is not None},
            n_tokens=data.n_tokens,
        )

    def _set_thresholds(
        self,
        model: nn.Module,
        wrapped: Wrapped,
        config: SparsifyConfig,
        data: TokenBlocks | None,
        calibration: Calibration,
        shares: list[float],
        progress: bool,
    ) -> list[torch.Tensor]:
        """Set every threshold; each further pass re-measures with the previous thresholds in
        place. Returns the (H,) histograms of the last pass."""
        from moefy.sparsify import calibrate as cal

        paths = [path for path, _ in wrapped]
        scales = [calibration.channel_scales.get(path) for path in paths]
        histograms = [calibration.histograms[path] for path in paths]
        for refinement in range(config.calibration_passes):
            if refinement > 0:
                if data is None:
                    break  # a reused calibration without text: dense-model thresholds only
                histograms = _histograms(model, wrapped, scales, config, data, progress)
            for (_, wrapper), histogram, scale, share in zip(
                wrapped, histograms, scales, shares, strict=True
            ):
                wrapper.threshold.copy_(cal.thresholds_for(histogram, scale, share)[1])
        return histograms

    def allocate(
        self,
        model: nn.Module,
        wrapped: Wrapped,
        config: SparsifyConfig,
        data: TokenBlocks | None,
        calibration: Calibration,
        progress: bool,
    ) -> list[float]:
        """The share of entries each wrapper zeroes: the same target for all."""
        return [config.sparsity] * len(wrapped)


def _histograms(
    model: nn.Module,
    wrapped: Wrapped,
    scales: list[torch.Tensor | None],
    config: SparsifyConfig,
    data: TokenBlocks,
    progress: bool,
) -> list[torch.Tensor]:
    """(H,) criterion histogram per wrapper over ``data``, with the model as it is now."""
    from moefy.arch import find_ffns
    from moefy.sparsify import calibrate as cal

    return cal.collect_histograms(
        model,
        [wrapper for _, wrapper in wrapped],
        scales,
        data,
        config.batch_size,
        last_module=find_ffns(model)[-1].block,
        progress=progress,
    )


def _allocations(
    wrapped: Wrapped,
    histograms: list[torch.Tensor],
    scales: list[torch.Tensor | None],
    shares: list[float],
) -> list[Allocation]:
    from moefy.sparsify import calibrate as cal
    from moefy.sparsify.histogram import histogram_share_at_or_below

    allocations = []
    for (path, wrapper), histogram, scale, share in zip(
        wrapped, histograms, scales, shares, strict=True
    ):
        criterion = cal.thresholds_for(histogram, scale, share)[0]
        allocations.append(
            Allocation(
                path=path,
                layer=wrapper.layer,
                role=wrapper.role,
                sparsity=share,
                criterion_threshold=criterion,
                calibration_sparsity=histogram_share_at_or_below(histogram, criterion),
            )
        )
    return allocations


# ---------------------------------------------------------------------------------------------
# thresholds on the inputs of every linear layer (TEAL, WINA)


class _LayerwiseHandler(_ThresholdHandler):
    """Thresholds on the inputs of the FFN's linear layers (and of attention's, if asked)."""

    def install(self, model: nn.Module, config: SparsifyConfig) -> Wrapped:
        from moefy.arch import find_ffns
        from moefy.sparsify.centring import threshold_wrapper_class

        assert isinstance(config, LayerwiseConfig)
        wrapper_cls = threshold_wrapper_class(config.centre)  # centred (SCAP) or plain
        wrapped: Wrapped = []
        names = {id(module): name for name, module in model.named_modules()}
        for site in find_ffns(model):
            if config.attention:
                self._install_attention(model, site, names[id(site.block)], wrapped, wrapper_cls)
            parts = ["gate"] if site.spec.gate is not None else []
            for part in [*parts, "up", "down"]:
                wrapper = wrapper_cls(
                    site.part(part),
                    layer=site.index,
                    role=getattr(site.spec, part),
                    per_channel=self.per_channel,
                )
                swap(model, site.module_path(part), wrapper, wrapped)
        return wrapped

    def prepare(self, model, wrapped, config, data, progress):
        """The per-channel centres of a centred config (``centre != "none"``), else nothing."""
        from moefy.sparsify.centring import centre_wrappers

        return centre_wrappers(model, wrapped, config, data, progress)

    def _install_attention(
        self,
        model: nn.Module,
        site: FFNSite,
        block_path: str,
        wrapped: Wrapped,
        wrapper_cls: type | None = None,
    ) -> None:
        from moefy.arch import attention_projection_paths, model_type_of
        from moefy.sparsify.wrappers import ThresholdLinear

        wrapper_cls = wrapper_cls or ThresholdLinear

        for relative in attention_projection_paths(model, site.block):
            path = f"{block_path}.{relative}"
            try:
                base = model.get_submodule(path)
            except AttributeError:
                raise MoefyError(
                    f"{model_type_of(model)}: no attention projection at {path}; fix its "
                    "entry with moefy.arch.register_attention_projections"
                ) from None
            wrapper = wrapper_cls(
                base, layer=site.index, role=relative, per_channel=self.per_channel
            )
            swap(model, path, wrapper, wrapped)

    def allocate(self, model, wrapped, config, data, calibration, progress):
        from moefy.sparsify import budget

        assert isinstance(config, LayerwiseConfig)
        if config.sparsity == 0.0:  # dense: thresholds that remove only exact zeros
            return super().allocate(model, wrapped, config, data, calibration, progress)
        if config.budget == "tail":
            return budget.tail_shares([w for _, w in wrapped], config.sparsity)
        plans = _block_plans(model, wrapped)
        if not config.greedy:
            return budget.uniform_shares(plans, len(wrapped), config.sparsity)
        reach = budget.greedy_reach_needed(plans, config.sparsity, config.budget)
        if calibration.greedy_reach < reach - 1e-12:
            _extend_greedy(model, wrapped, plans, config, data, calibration, reach, progress)
        if config.budget == "global":
            return budget.global_shares(
                plans,
                len(wrapped),
                calibration.trajectories,
                calibration.trajectory_errors,
                config.sparsity,
            )
        return budget.block_shares(plans, len(wrapped), calibration.trajectories, config.sparsity)


def _extend_greedy(
    model: nn.Module,
    wrapped: Wrapped,
    plans: list[BlockPlan],
    config: LayerwiseConfig,
    data: TokenBlocks | None,
    calibration: Calibration,
    reach: float,
    progress: bool,
) -> None:
    """Run the greedy search up to block sparsity ``reach`` and keep its trajectories."""
    from moefy.data.blocks import TokenBlocks
    from moefy.sparsify import calibrate as cal

    if data is None:
        raise MoefyError(
            f"the calibration's greedy search reaches {calibration.greedy_reach:.3f}, "
            f"below the {reach:.3f} the target {config.sparsity} needs: pass data to extend it"
        )
    histograms = [calibration.histograms[p] for p, _ in wrapped]
    scales = [calibration.channel_scales.get(p) for p, _ in wrapped]
    n_blocks = min(data.num_blocks, max(1, math.ceil(config.greedy_tokens / data.block_len)))
    sample = TokenBlocks(data.input_ids[:n_blocks], data.source, data.split)
    calibration.trajectories, calibration.trajectory_errors = cal.greedy_trajectories(
        model,
        plans,
        histograms,
        scales,
        sample,
        config.batch_size,
        target=reach,
        step=config.greedy_step,
        sink_positions=config.greedy_sink_positions,
        relative=config.budget == "global",
        progress=progress,
    )
    calibration.greedy_reach = reach


def _block_plans(model: nn.Module, wrapped: Wrapped) -> list[BlockPlan]:
    """Group wrappers by block; measure each at its FFN when all its wrappers are inside it."""
    from moefy.arch import find_ffns
    from moefy.sparsify import calibrate as cal

    sites = {site.index: site for site in find_ffns(model)}
    by_layer: dict[int, list[int]] = {}
    for index, (_, wrapper) in enumerate(wrapped):
        by_layer.setdefault(wrapper.layer, []).append(index)
    plans = []
    for layer, indices in by_layer.items():
        site = sites[layer]
        inside_ffn = not site.spec.inline and all(
            wrapped[i][0].startswith(site.name + ".") for i in indices
        )
        plans.append(
            cal.BlockPlan(
                layer=layer,
                unit=site.module if inside_ffn else site.block,
                wrappers=[wrapped[i][1] for i in indices],
                indices=indices,
                block=site.block,
            )
        )
    return plans
