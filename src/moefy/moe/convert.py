"""The verb: ``moefy_`` turns dense FFNs into :class:`MoEFFN` in place; ``unmoefy`` undoes it.

Shape legend:
    F: FFN width (d_ff), D: model width, E: experts, S: slots per expert
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import nn

from moefy.arch import FFNSite, find_ffns, get_spec, model_type_of, replace_ffn, restore_ffn
from moefy.arch.spec import FFNWeights
from moefy.cost import reset_counters
from moefy.errors import MoefyError, check_config
from moefy.moe.config import ExpertLayout, MoEfyConfig
from moefy.moe.module import MoEFFN
from moefy.moe.split import (
    SPLIT_METHODS,
    SplitMethod,
    SplitRequest,
    expert_slots,
    split_neurons,
)
from moefy.validate import keep_or_fraction

# A neuron is a shared-expert neuron under the "profile" shared rule when it is top at least
# this many times as often as the average neuron (whose rate is the profile's top_share).
SHARED_RATE_FACTOR = 2.0
# ProfileConfig.top_share's default, for a profile that does not say its own.
DEFAULT_TOP_SHARE = 0.1
# The "profile" shared rule makes at most this share of a layer's experts shared when
# MoEfyConfig.shared is 0 (otherwise at most round(shared * E)).
PROFILE_RULE_CAP = 0.5


class CoactivationProfile(Protocol):
    """What ``moefy_`` reads from a :class:`moefy.profiling.SparsityProfile` (each method only
    when the split method or the shared experts need it)."""

    fingerprint: dict[str, Any]

    def coactivation(self, layer_index: int) -> torch.Tensor:
        """(F, F) co-activation counts."""
        ...

    def activation_rate(self, layer_index: int) -> torch.Tensor:
        """(F,) share of tokens for which each neuron is among the top ones."""
        ...

    def activation_patterns(self, layer_index: int) -> torch.Tensor:
        """(F, T) contribution shares of each neuron on T sampled tokens."""
        ...


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    """The :class:`MoEFFN` modules of ``model`` in layer order."""
    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    return sorted(layers, key=lambda m: m.layer_index)


def _named_blocks(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def model_fingerprint(model: nn.Module, sites: list[FFNSite] | None = None) -> dict[str, Any]:
    """The identity of a model's FFN stack that a profile must match.

    Returns:
        ``{"model_type", "num_layers", "d_model", "d_ff": [per layer]}``.
    """
    sites = sites if sites is not None else find_ffns(model)
    weights = [site.weights() for site in sites]
    return {
        "model_type": model_type_of(model),
        "num_layers": len(sites),
        "d_model": weights[0].d_model,
        "d_ff": [w.d_ff for w in weights],
    }


def check_profile_matches(profile: CoactivationProfile, fingerprint: dict[str, Any]) -> None:
    """Raise :class:`MoefyError` when a profile was taken on a different model.

    Args:
        profile: anything with a ``fingerprint`` dict (a ``SparsityProfile``).
        fingerprint: :func:`model_fingerprint` of the model to convert.
    """
    theirs = getattr(profile, "fingerprint", None)
    if not isinstance(theirs, dict):
        raise MoefyError("the profile has no fingerprint; re-run moefy profile")
    for key, ours in fingerprint.items():
        if key not in theirs:
            continue
        value = theirs[key]
        if key == "d_ff" and isinstance(value, int):
            value = [value] * len(ours)
        if isinstance(value, tuple):
            value = list(value)
        if value != ours:
            raise MoefyError(
                f"the profile is from another model: its {key} is {value!r}, this model's is "
                f"{ours!r}; profile this model first"
            )


def moefy_(
    model: nn.Module,
    config: MoEfyConfig,
    filter_fn: Callable[[FFNSite], bool] | None = None,
    profile: CoactivationProfile | None = None,
    *,
    progress: bool = False,
) -> nn.Module:
    """Turn the model's dense FFNs into :class:`MoEFFN` modules, in place.

    Every expert runs until a selection is set (:func:`set_selection`), so the converted model
    first computes what the dense one did. With ``config.shared`` (or the ``profile`` shared
    rule) the first experts of each layer are shared: they hold the neurons with the highest
    activation rates in the profile and run for every token; the split method groups the
    other neurons into the routed experts.

    Args:
        model: a supported model (see :mod:`moefy.arch`), not yet moefied.
        config: how to split each FFN.
        filter_fn: ``site -> bool``; only accepted FFNs are converted (default all).
        profile: a ``SparsityProfile``: co-activation counts for ``coactivation``, activation
            patterns for methods that need them, activation rates for shared experts; checked
            against the model.
        progress: show a progress bar over layers.

    Returns:
        ``model``, changed in place.

    Raises:
        MoefyError: the model is moefied already, the filter accepts nothing, the method or
            the shared experts need a profile that is missing or from another model, or a
            layer cannot be split as asked (then no layer is changed).

    Example:
        >>> moefy_(model, MoEfyConfig(num_experts=64, method="params"))
        >>> set_selection(model, keep=0.25)
    """
    check_config(config, MoEfyConfig)
    if moe_layers(model):
        raise MoefyError("the model is moefied already; call moefy.unmoefy(model) first")
    sites = find_ffns(model)
    method = SPLIT_METHODS.get(config.method).value
    _check_profile_given(config, method, profile)
    if profile is not None:
        check_profile_matches(profile, model_fingerprint(model, sites))
    chosen = [site for site in sites if filter_fn is None or filter_fn(site)]
    if not chosen:
        raise MoefyError("filter_fn accepted no FFN layer")
    # Plan every layer before changing anything, so a bad config leaves the model untouched.
    plans = [_plan_layer(config, site, profile) for site in chosen]
    block_names = _named_blocks(model)
    for site, layout, rates in _progress(plans, progress):
        weights = site.weights()
        request = SplitRequest(weights=weights, layout=layout, seed=config.seed + site.index)
        slots = _split_layer(config.method, request, rates, profile, site.index)  # (E, S)
        moe = MoEFFN.from_dense(weights, slots, num_shared=layout.num_shared)
        moe.layer_index, moe.site_name = site.index, site.name
        moe.block_name = block_names[id(site.block)]
        moe.moefy_config = config
        moe.train(site.module.training)
        moe.keep_dense_skeleton(replace_ffn(model, site, moe))
    return model


def _wants_shared(config: MoEfyConfig) -> bool:
    return config.shared > 0 or config.shared_rule == "profile"


def _check_profile_given(
    config: MoEfyConfig, method: SplitMethod, profile: CoactivationProfile | None
) -> None:
    """One line when the split method or the shared experts need a profile and none is given,
    or the profile lacks what they read."""
    if profile is None:
        if method.needs_coactivation:
            raise MoefyError(f"method {config.method!r} needs profile= (a SparsityProfile)")
        if method.needs_patterns:
            raise MoefyError(
                f"method {config.method!r} needs profile= (a SparsityProfile with activation "
                "patterns, made by moefy profile)"
            )
        if _wants_shared(config):
            raise MoefyError(
                "shared experts need profile= (a SparsityProfile with activation rates)"
            )
        return
    needs_rates = method.needs_patterns or _wants_shared(config)
    if needs_rates and getattr(profile, "has_activation_rates", True) is False:
        raise MoefyError(
            "the profile has no activation rates (made by an older moefy); re-run moefy profile"
        )


def _plan_layer(
    config: MoEfyConfig, site: FFNSite, profile: CoactivationProfile | None
) -> tuple[FFNSite, ExpertLayout, torch.Tensor | None]:
    """A layer's expert layout (shared experts counted) and, when it has shared experts, its
    neurons' (F,) activation rates."""
    layout = config.layout(site.weights().d_ff)
    if profile is None or not _wants_shared(config):
        return site, layout, None
    rates = _activation_rates(profile, site.index, layout.d_ff)  # (F,)
    if config.shared_rule == "profile":
        most = _round(PROFILE_RULE_CAP * layout.num_experts)
        cap = layout.num_shared if config.shared > 0 else most
        layout = layout.with_shared(shared_count(rates, layout, _top_share(profile), cap))
    return site, layout, rates if layout.num_shared else None


def shared_count(rates: torch.Tensor, layout: ExpertLayout, top_share: float, cap: int) -> int:
    """Shared experts of one layer under the ``profile`` shared rule.

    The neurons at least :data:`SHARED_RATE_FACTOR` times as often top as the average neuron
    (activation rate >= ``SHARED_RATE_FACTOR * top_share``), in whole experts (rounded), at
    most ``cap`` and leaving at least one routed expert.

    Args:
        rates: (F,) activation rates of the layer's neurons.
        layout: the layer's expert layout.
        top_share: the profile's ``top_share`` (the rate of an average neuron).
        cap: the most shared experts allowed.

    Returns:
        The number of shared experts.

    Example:
        >>> layout = ExpertLayout(num_experts=4, expert_size=1, real_sizes=(1, 1, 1, 1))
        >>> shared_count(torch.tensor([0.9, 0.5, 0.1, 0.0]), layout, top_share=0.1, cap=2)
        2
    """
    frequent = int((rates >= SHARED_RATE_FACTOR * top_share).sum())
    per_expert = layout.d_ff / layout.num_experts  # real neurons of an average expert
    return max(0, min(_round(frequent / per_expert), cap, layout.num_experts - 1))


def _round(value: float) -> int:
    """``value`` rounded to an integer, halves up (as MoEfyConfig rounds expert counts)."""
    return math.floor(value + 0.5)


def _top_share(profile: CoactivationProfile) -> float:
    """The share of neurons that counts as a token's top ones in the profile."""
    return float(getattr(getattr(profile, "config", None), "top_share", DEFAULT_TOP_SHARE))


def _activation_rates(profile: CoactivationProfile, index: int, d_ff: int) -> torch.Tensor:
    """(F,) float32 activation rates of layer ``index``, checked against its width."""
    rates = torch.as_tensor(profile.activation_rate(index)).detach().float().cpu()
    if rates.shape != (d_ff,) or not bool(torch.isfinite(rates).all()):
        raise MoefyError(
            f"the profile's activation rates of layer {index} have shape {tuple(rates.shape)} "
            f"(or are not finite); layer {index} has {d_ff} neurons: re-run moefy profile"
        )
    return rates


def _split_layer(
    method: str,
    request: SplitRequest,
    rates: torch.Tensor | None,
    profile: CoactivationProfile | None,
    index: int,
) -> torch.Tensor:
    """(E, S) slot table of one layer: the shared experts hold the highest-rate neurons (in
    rate order), and the split method groups the rest into the routed experts."""
    entry = SPLIT_METHODS.get(method).value
    layout = request.layout
    rest = None
    if layout.num_shared:
        order = torch.argsort(rates, descending=True, stable=True)  # (F,) most often top first
        shared, rest = order[: layout.shared_neurons], order[layout.shared_neurons :].sort().values
        request = replace(
            request, weights=_neuron_subset(request.weights, rest), layout=layout.routed()
        )
    coactivation = profile.coactivation(index) if entry.needs_coactivation else None
    patterns = profile.activation_patterns(index) if entry.needs_patterns else None
    if rest is not None:  # the rows and columns of the routed neurons
        coactivation = None if coactivation is None else coactivation[rest][:, rest]
        patterns = None if patterns is None else patterns[rest]
    slots = split_neurons(method, replace(request, coactivation=coactivation, patterns=patterns))
    if rest is None:
        return slots
    return _join_shared(shared, rest, slots, layout)


def _join_shared(
    shared: torch.Tensor, rest: torch.Tensor, routed_slots: torch.Tensor, layout: ExpertLayout
) -> torch.Tensor:
    """The whole layer's (E, S) slot table from the shared neurons (in rate order) and the
    routed experts' (E - ns, S) slot table over ``rest``."""
    ns = layout.num_shared
    labels = torch.empty(layout.d_ff, dtype=torch.long)  # (F,) expert of each neuron
    sizes = torch.tensor(layout.real_sizes[:ns])
    labels[shared] = torch.repeat_interleave(torch.arange(ns), sizes)
    real = routed_slots >= 0  # (E - ns, S)
    experts = torch.arange(ns, layout.num_experts).unsqueeze(1).expand_as(routed_slots)
    labels[rest[routed_slots[real]]] = experts[real]
    return expert_slots(labels, layout)


def _neuron_subset(weights: FFNWeights, rows: torch.Tensor) -> FFNWeights:
    """The FFN of the neurons ``rows`` only (copies)."""
    rows = rows.to(weights.w_up.device)

    def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach()[rows]

    return replace(
        weights,
        w_up=pick(weights.w_up),
        w_gate=pick(weights.w_gate),
        b_up=pick(weights.b_up),
        b_gate=pick(weights.b_gate),
        w_down=weights.w_down.detach()[:, rows],
    )


def _progress(items: list, enabled: bool) -> Iterator:
    if not enabled:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc="moefy", unit="layer"))


def _site_of(model: nn.Module, moe: MoEFFN) -> FFNSite:
    """The FFN site a MoEFFN stands in for (its module is whatever sits there now)."""
    spec = get_spec(model)
    block = model.get_submodule(moe.block_name) if moe.block_name else model
    module = model.get_submodule(moe.site_name)
    return FFNSite(index=moe.layer_index, name=moe.site_name, block=block, module=module, spec=spec)


def unmoefy(model: nn.Module) -> nn.Module:
    """Put back the dense FFNs, with weights rebuilt exactly from the experts, in place.

    Args:
        model: a model converted by :func:`moefy_` or loaded by ``from_pretrained``.

    Returns:
        ``model``, changed in place; its outputs equal the model's before ``moefy_``.

    Raises:
        MoefyError: the model has no MoE layer.
    """
    layers = moe_layers(model)
    if not layers:
        raise MoefyError("the model has no MoE layers to restore")
    for moe in layers:
        dense = moe.dense_weights()
        modules = moe.rebuild_dense_modules()
        site = _site_of(model, moe)
        restore_ffn(model, site, modules)
        restored = _site_of(model, moe).weights()
        with torch.no_grad():
            for name in ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down"):
                target, source = getattr(restored, name), dense[name]
                if target is None:
                    continue
                if source is None:  # the MoE kept no bias here: the dense one was zero
                    target.zero_()
                else:
                    target.copy_(source)
        for module in modules.values():
            module.train(moe.training)
    return model


def set_selection(
    model: nn.Module,
    k: int | None = None,
    fraction: float | None = None,
    *,
    keep: float | None = None,
) -> int:
    """Set how many experts every MoE layer runs per token (top-k of its selector).

    Args:
        model: a moefied model.
        k: experts per token (1 <= k <= E of every layer).
        fraction: former name of ``keep`` (deprecated).
        keep: share of experts kept per token, in (0, 1]. Neither k nor keep: every expert runs.

    Returns:
        The number of MoE layers changed.

    Raises:
        MoefyError: no MoE layers, both k and keep, or out of range for some layer (then no
            layer is changed).

    Example:
        >>> set_selection(model, keep=0.25)
        30
    """
    keep = keep_or_fraction(keep, fraction, where="set_selection")
    layers = moe_layers(model)
    if not layers:
        raise MoefyError("the model has no MoE layers; call moefy_ first")
    previous = [(m.selector.k, m.selector.fraction) for m in layers]
    try:
        for moe in layers:
            moe.selector.set_topk(k=k, fraction=keep)
    except MoefyError:
        for moe, (old_k, old_fraction) in zip(layers, previous, strict=True):
            moe.selector.set_topk(k=old_k, fraction=old_fraction)
        raise
    return len(layers)


# The former name of moefy.cost.reset_counters: forgets the MoE tallies (and every other swapped
# module's counters).
reset_tally = reset_counters
