"""The verb: ``moefy_`` turns dense FFNs into :class:`MoEFFN` in place; ``unmoefy`` undoes it.

Shape legend:
    F: FFN width (d_ff), D: model width, E: experts, S: slots per expert
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from moefy.arch import FFNSite, find_ffns, get_spec, model_type_of, replace_ffn, restore_ffn
from moefy.cost import reset_counters
from moefy.errors import MoefyError, check_config
from moefy.moe.config import MoEfyConfig
from moefy.moe.module import MoEFFN
from moefy.moe.split import SPLIT_METHODS, SplitRequest, split_neurons
from moefy.validate import keep_or_fraction


class CoactivationProfile(Protocol):
    """What ``moefy_`` reads from a :class:`moefy.profiling.SparsityProfile`."""

    fingerprint: dict[str, Any]

    def coactivation(self, layer_index: int) -> torch.Tensor: ...


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
    first computes what the dense one did.

    Args:
        model: a supported model (see :mod:`moefy.arch`), not yet moefied.
        config: how to split each FFN.
        filter_fn: ``site -> bool``; only accepted FFNs are converted (default all).
        profile: a ``SparsityProfile`` with co-activation counts; needed by ``coactivation``
            and checked against the model.
        progress: show a progress bar over layers.

    Returns:
        ``model``, changed in place.

    Raises:
        MoefyError: the model is moefied already, the filter accepts nothing, the method needs a
            profile that is missing or from another model, or a layer cannot be split as asked.

    Example:
        >>> moefy_(model, MoEfyConfig(num_experts=64, method="params"))
        >>> set_selection(model, keep=0.25)
    """
    check_config(config, MoEfyConfig)
    if moe_layers(model):
        raise MoefyError("the model is moefied already; call moefy.unmoefy(model) first")
    sites = find_ffns(model)
    method = SPLIT_METHODS.get(config.method).value
    if method.needs_coactivation and profile is None:
        raise MoefyError(f"method {config.method!r} needs profile= (a SparsityProfile)")
    if profile is not None:
        check_profile_matches(profile, model_fingerprint(model, sites))
    chosen = [site for site in sites if filter_fn is None or filter_fn(site)]
    if not chosen:
        raise MoefyError("filter_fn accepted no FFN layer")
    # Check every layout before changing anything, so a bad config leaves the model untouched.
    layouts = [config.layout(site.weights().d_ff) for site in chosen]
    block_names = _named_blocks(model)
    for site, layout in _progress(list(zip(chosen, layouts, strict=True)), progress):
        weights = site.weights()
        coactivation = profile.coactivation(site.index) if method.needs_coactivation else None
        request = SplitRequest(
            weights=weights, layout=layout, seed=config.seed + site.index, coactivation=coactivation
        )
        slots = split_neurons(config.method, request)  # (E, S)
        moe = MoEFFN.from_dense(weights, slots)
        moe.layer_index, moe.site_name = site.index, site.name
        moe.block_name = block_names[id(site.block)]
        moe.moefy_config = config
        moe.train(site.module.training)
        moe.keep_dense_skeleton(replace_ffn(model, site, moe))
    return model


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
