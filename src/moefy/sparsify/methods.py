"""One handler per method, found through a registry keyed by the config's type.

A handler does two things: ``install`` swaps sparse wrappers (with zero thresholds) into the model
— the structure only, which is also how a saved model is rebuilt before its state dict is loaded —
and ``calibrate`` sets their thresholds from calibration text. Adding a method is one config class
(``config.py``) plus one handler registered here with :func:`register_method`.

Shape legend:
    C: channels of a sparsified tensor, H: histogram bins, S: greedy steps, W: wrappers of a block
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moefy.arch import FFNSite, find_ffns, model_type_of
from moefy.arch.spec import set_submodule
from moefy.data.blocks import TokenBlocks
from moefy.dist import all_reduce_sum_
from moefy.errors import MoefyError
from moefy.sparsify import calibrate as cal
from moefy.sparsify.attention import attention_projection_paths
from moefy.sparsify.config import (
    CalibratedConfig,
    CATSConfig,
    CHESSConfig,
    LayerwiseConfig,
    SparsifyConfig,
    TEALConfig,
    TopKConfig,
    WINAConfig,
)
from moefy.sparsify.histogram import histogram_share_at_or_below
from moefy.sparsify.wrappers import (
    SparseModule,
    ThresholdActivation,
    ThresholdLinear,
    TopKLinear,
    input_column_norms,
)

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
        greedy_reach: the highest block sparsity the trajectories reach.
        n_tokens: calibration tokens streamed.
    """

    method: str
    settings: dict
    paths: tuple[str, ...]
    histograms: dict[str, torch.Tensor]
    channel_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    trajectories: dict[int, torch.Tensor] = field(default_factory=dict)
    greedy_reach: float = 0.0
    n_tokens: int = 0


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
    """Installs and calibrates one method's wrappers."""

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


# config type -> handler; filled at the end of this module.
HANDLERS: dict[type[SparsifyConfig], MethodHandler] = {}


def register_method(config_type: type[SparsifyConfig], handler: MethodHandler) -> None:
    """Make ``sparsify_`` dispatch configs of ``config_type`` to ``handler``.

    Example:
        >>> register_method(MyConfig, MyHandler())
    """
    HANDLERS[config_type] = handler


def handler_for(config: SparsifyConfig) -> MethodHandler:
    """The handler registered for ``type(config)``."""
    handler = HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(sorted(t.__name__ for t in HANDLERS))
        raise MoefyError(f"no sparsify method for {type(config).__name__}: use one of {known}")
    return handler


# ---------------------------------------------------------------------------------------------
# helpers shared by the handlers


def _swap(model: nn.Module, path: str, wrapper: SparseModule, wrapped: Wrapped) -> None:
    set_submodule(model, path, wrapper)
    wrapped.append((path, wrapper))


def _ffn_weight_count(site: FFNSite) -> int:
    weights = site.weights()
    gate = weights.w_gate.numel() if weights.w_gate is not None else 0
    return weights.w_up.numel() + gate + weights.w_down.numel()


def _block_paths(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _require_gated(site: FFNSite, model: nn.Module, method: str) -> None:
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
        wrappers = [wrapper for _, wrapper in wrapped]
        last_module = find_ffns(model)[-1].block
        if calibration is not None:
            _check_reuse(calibration, config, paths)
        else:
            if data is None:
                raise MoefyError(
                    f"{config.method} needs calibration text: pass data=TokenBlocks (or a "
                    "calibration from an earlier report)"
                )
            scales = self.channel_scales(model, wrapped, config, data, progress)
            histograms = cal.collect_histograms(
                model,
                wrappers,
                scales,
                data,
                config.batch_size,
                last_module=last_module,
                progress=progress,
            )
            calibration = Calibration(
                method=config.method,
                settings=_settings(config),
                paths=paths,
                histograms=dict(zip(paths, histograms, strict=True)),
                channel_scales={p: s for p, s in zip(paths, scales, strict=True) if s is not None},
                n_tokens=data.n_tokens,
            )
        shares = self.allocate(model, wrapped, config, data, calibration, progress)
        scales = [calibration.channel_scales.get(path) for path in paths]
        histograms = [calibration.histograms[path] for path in paths]
        for refinement in range(config.calibration_passes):
            if refinement > 0:
                if data is None:
                    break  # a reused calibration without text: dense-model thresholds only
                histograms = cal.collect_histograms(
                    model,
                    wrappers,
                    scales,
                    data,
                    config.batch_size,
                    last_module=last_module,
                    progress=progress,
                )
            for wrapper, histogram, scale, share in zip(
                wrappers, histograms, scales, shares, strict=True
            ):
                wrapper.threshold.copy_(cal.thresholds_for(histogram, scale, share)[1])
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
        return allocations, calibration

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


# ---------------------------------------------------------------------------------------------
# the methods


class TopKHandler(MethodHandler):
    """Top-k on the input of every FFN's down projection."""

    def install(self, model: nn.Module, config: SparsifyConfig) -> Wrapped:
        wrapped: Wrapped = []
        for site in find_ffns(model):
            d_ff = site.weights().d_ff
            k = d_ff - round(config.sparsity * d_ff)
            wrapper = TopKLinear(site.part("down"), layer=site.index, role=site.spec.down, k=k)
            wrapper.scope_weights = _ffn_weight_count(site)  # gate and up run in full
            _swap(model, site.module_path("down"), wrapper, wrapped)
        return wrapped

    def calibrate(self, model, wrapped, config, data, calibration, progress):
        allocations = [
            Allocation(
                path=path,
                layer=w.layer,
                role=w.role,
                sparsity=1.0 - w.k / w.in_features,  # type: ignore[attr-defined]
                criterion_threshold=None,
                calibration_sparsity=None,
            )
            for path, w in wrapped
        ]
        return allocations, None


class CATSHandler(_ThresholdHandler):
    """One threshold per layer on ``|act(gate(x))|``."""

    method_name = "CATS"

    def install(self, model: nn.Module, config: SparsifyConfig) -> Wrapped:
        wrapped: Wrapped = []
        for site in find_ffns(model):
            _require_gated(site, model, self.method_name)
            weights = site.weights()
            wrapper = ThresholdActivation(
                site.part("act"),
                layer=site.index,
                role=site.spec.act,
                d_model=weights.d_model,
                d_ff=weights.d_ff,
                per_channel=self.per_channel,
            )
            _swap(model, site.module_path("act"), wrapper, wrapped)
        return wrapped


class CHESSHandler(CATSHandler):
    """One threshold per neuron: ``|act(gate_i)| * E|up_i| <= t``."""

    method_name = "CHESS"
    per_channel = True

    def channel_scales(self, model, wrapped, config, data, progress):
        sites = {site.index: site for site in find_ffns(model)}
        device = cal.device_of(model)
        wrappers = [wrapper for _, wrapper in wrapped]
        # Per wrapper: sum of |up| per neuron (F,) and the token count; reduced as one tensor.
        sums = [torch.zeros(w.d_ff + 1, dtype=torch.float64, device=device) for w in wrappers]
        handles = []

        def _accumulate(i: int, fused: bool):
            def _hook(_module: nn.Module, _args: object, out: torch.Tensor) -> None:
                up = (
                    out[..., out.shape[-1] // 2 :] if fused else out
                )  # (..., F): up half of [gate; up]
                up = up.detach().abs().double().reshape(-1, up.shape[-1])  # (N, F)
                sums[i][:-1] += up.sum(dim=0)
                sums[i][-1] += up.shape[0]

            return _hook

        try:
            for i, wrapper in enumerate(wrappers):
                site = sites[wrapper.layer]
                hook = _accumulate(i, site.spec.fused_gate_up)
                handles.append(site.part("up").register_forward_hook(hook))
            cal.stream(
                model,
                data,
                config.batch_size,
                last_module=find_ffns(model)[-1].block,
                desc="up statistics",
                progress=progress,
            )
        finally:
            for handle in handles:
                handle.remove()
        totals = all_reduce_sum_(torch.cat(sums)).split([w.d_ff + 1 for w in wrappers])
        # (F,) mean |up_i| per neuron of each layer
        return [(total[:-1] / total[-1].clamp_min(1.0)).float() for total in totals]


class _LayerwiseHandler(_ThresholdHandler):
    """Thresholds on the inputs of the FFN's linear layers (and of attention's, if asked)."""

    def install(self, model: nn.Module, config: SparsifyConfig) -> Wrapped:
        assert isinstance(config, LayerwiseConfig)
        wrapped: Wrapped = []
        names = _block_paths(model) if config.attention else {}
        for site in find_ffns(model):
            if config.attention:
                block_path = names[id(site.block)]
                for relative in attention_projection_paths(model, site.block):
                    path = f"{block_path}.{relative}"
                    try:
                        base = model.get_submodule(path)
                    except AttributeError:
                        raise MoefyError(
                            f"{model_type_of(model)}: no attention projection at {path}; fix its "
                            "entry with moefy.sparsify.register_attention_projections"
                        ) from None
                    wrapper = ThresholdLinear(
                        base, layer=site.index, role=relative, per_channel=self.per_channel
                    )
                    _swap(model, path, wrapper, wrapped)
            parts = ["gate"] if site.spec.gate is not None else []
            for part in [*parts, "up", "down"]:
                wrapper = ThresholdLinear(
                    site.part(part),
                    layer=site.index,
                    role=getattr(site.spec, part),
                    per_channel=self.per_channel,
                )
                _swap(model, site.module_path(part), wrapper, wrapped)
        return wrapped

    def allocate(self, model, wrapped, config, data, calibration, progress):
        assert isinstance(config, LayerwiseConfig)
        if not config.greedy or config.sparsity == 0.0:
            return super().allocate(model, wrapped, config, data, calibration, progress)
        plans = _block_plans(model, wrapped)
        if calibration.greedy_reach < config.sparsity - 1e-12:
            if data is None:
                raise MoefyError(
                    f"the calibration's greedy search reaches {calibration.greedy_reach:.3f}, "
                    f"below the target {config.sparsity}: pass data to extend it"
                )
            histograms = [calibration.histograms[p] for p, _ in wrapped]
            scales = [calibration.channel_scales.get(p) for p, _ in wrapped]
            n_blocks = min(
                data.num_blocks, max(1, math.ceil(config.greedy_tokens / data.block_len))
            )
            sample = TokenBlocks(data.input_ids[:n_blocks], data.source, data.split)
            calibration.trajectories = cal.greedy_trajectories(
                model,
                plans,
                histograms,
                scales,
                sample,
                config.batch_size,
                target=config.sparsity,
                step=config.greedy_step,
                progress=progress,
            )
            calibration.greedy_reach = config.sparsity
        shares = [0.0] * len(wrapped)
        for plan in plans:
            weights = torch.tensor([w.scope_weights for w in plan.wrappers], dtype=torch.float64)
            block_shares = cal.shares_at(
                calibration.trajectories[plan.layer], weights, config.sparsity
            )
            for index, share in zip(plan.indices, block_shares.tolist(), strict=True):
                shares[index] = share
        return shares


def _block_plans(model: nn.Module, wrapped: Wrapped) -> list[cal.BlockPlan]:
    """Group wrappers by block; measure each at its FFN when all its wrappers are inside it."""
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
            )
        )
    return plans


class TEALHandler(_LayerwiseHandler):
    """TEAL: one ``|x|`` threshold per linear layer."""


class WINAHandler(_LayerwiseHandler):
    """WINA: ``|x_i| * ||W[:, i]||`` thresholds, stored per input channel."""

    per_channel = True

    def channel_scales(self, model, wrapped, config, data, progress):
        return [input_column_norms(wrapper.base_layer) for _, wrapper in wrapped]


HANDLERS.update(
    {
        TopKConfig: TopKHandler(),
        TEALConfig: TEALHandler(),
        WINAConfig: WINAHandler(),
        CATSConfig: CATSHandler(),
        CHESSConfig: CHESSHandler(),
    }
)
