"""What identifies a model's FFN layout, so a profile is applied only to the model it measured."""

from __future__ import annotations

from typing import Any

from torch import nn

from moefy.arch import find_ffns, model_type_of


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a model's FFN layout: checked before a profile is applied to a model.

    Args:
        model: a supported model.

    Returns:
        ``{"model_type", "num_layers", "d_model", "d_ff" (list, one per layer), "model_name"}``;
        ``model_name`` is ``config.name_or_path`` or ``""``.

    Example:
        >>> model_fingerprint(model)["d_ff"][:2]
        [1536, 1536]
    """
    sites = find_ffns(model)
    weights = [site.weights() for site in sites]
    config = getattr(model, "config", None)
    return {
        "model_type": model_type_of(model),
        "num_layers": len(sites),
        "d_model": weights[0].d_model,
        "d_ff": [w.d_ff for w in weights],
        "model_name": str(getattr(config, "name_or_path", "") or ""),
    }
