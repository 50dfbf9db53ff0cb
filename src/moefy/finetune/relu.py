"""ReLUfication: swap every FFN activation for ReLU (or FATReLU, a ReLU with a threshold).

SiLU and GELU are rarely exactly zero, so a token's FFN uses nearly every neuron. ReLU makes
every negative pre-activation an exact zero; after a little fine-tuning (ProSparse, ReLU
Strikes Back) most neurons are zero for most tokens, which MoEfication and the sparse kernels
turn into saved work. FATReLU (``threshold > 0``) also zeroes small positive values.

The model's Hugging Face config records ``relu`` as its activation, so ``save_pretrained`` gives
back a ReLU model. A FATReLU threshold is recorded in the config as ``moefy_fatrelu_threshold``;
:func:`reapply_fatrelu` puts it back into a dense model loaded from a plain folder
(``moefy.load_model`` does). :func:`moefy.save` records the relu change (``moefy_relu.json``)
and replays it first, before the changes made after it (MoEfication, sparsity), so a FATReLU
model stays one after any of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.models.marked import base_marker, read_marker
from moefy.saving.changes import ChangeFormat, Header, register_format

THRESHOLD_KEY = "moefy_fatrelu_threshold"
FORMAT_NAME = "moefy-relu"
FORMAT_VERSION = 1
MARKER_FILE = "moefy_relu.json"
# config fields that name the FFN activation in transformers' configs
_ACT_FIELDS = ("hidden_act", "hidden_activation", "activation_function", "dense_act_fn")


class FATReLU(nn.Module):
    """``x if x > threshold else 0`` (plain ReLU at threshold 0).

    Attributes:
        threshold: values at or below it become exactly 0.
    """

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold == 0.0:
            return torch.relu(x)
        return torch.where(x > self.threshold, x, torch.zeros_like(x))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


def _set_config_activation(config: object, threshold: float) -> None:
    for field in _ACT_FIELDS:
        if isinstance(getattr(config, field, None), str):
            setattr(config, field, "relu")
    proj = getattr(config, "feed_forward_proj", None)  # T5 rebuilds dense_act_fn from it
    if isinstance(proj, str):
        config.feed_forward_proj = "gated-relu" if proj.startswith("gated-") else "relu"
    if threshold > 0.0:
        setattr(config, THRESHOLD_KEY, threshold)
    elif hasattr(config, THRESHOLD_KEY):
        delattr(config, THRESHOLD_KEY)


def relufy_(model: nn.Module, threshold: float = 0.0) -> int:
    """Replace the activation of every FFN of ``model`` with ReLU / FATReLU, in place.

    Only the activation modules change: weights, norms and attention stay as they were.

    Args:
        model: a supported model with dense FFNs (before moefy or sparsify).
        threshold: FATReLU threshold (0: plain ReLU).

    Returns:
        The number of FFN layers changed.

    Raises:
        MoefyError: a negative threshold, an unsupported architecture, or FFNs that were already
            moefied or wrapped.

    Example:
        >>> relufy_(model)
        30
        >>> model.config.hidden_act
        'relu'
    """
    from moefy.arch.registry import find_ffns
    from moefy.arch.spec import set_submodule

    if not threshold >= 0.0:
        raise MoefyError(f"the FATReLU threshold must be >= 0, got {threshold}")
    sites = find_ffns(model)
    for site in sites:
        set_submodule(model, site.module_path("act"), FATReLU(threshold))
    config = getattr(model, "config", None)
    if config is not None:
        _set_config_activation(config, float(threshold))
    return len(sites)


def reapply_fatrelu(model: nn.Module) -> bool:
    """Put a FATReLU threshold recorded in the config back into the FFNs (after loading).

    Returns:
        Whether a threshold was found and applied.
    """
    threshold = getattr(getattr(model, "config", None), THRESHOLD_KEY, None)
    if not threshold:
        return False
    from moefy.arch.registry import find_ffns

    for site in find_ffns(model):
        act = site.part("act")
        if isinstance(act, FATReLU):
            act.threshold = float(threshold)
        elif isinstance(act, nn.ReLU) or type(act).__name__ == "ReLUActivation":
            from moefy.arch.spec import set_submodule

            set_submodule(model, site.module_path("act"), FATReLU(float(threshold)))
        else:
            raise MoefyError(
                f"the config records a FATReLU threshold but {site.name} computes "
                f"{type(act).__name__}: the folder is inconsistent, save it again"
            )
    return True


def _capture(model: nn.Module) -> dict[str, Any] | None:
    """The record of a relufied model (its FATReLU threshold), or None when it has no FATReLU."""
    thresholds = {m.threshold for m in model.modules() if isinstance(m, FATReLU)}
    if not thresholds:
        return None
    if len(thresholds) > 1:
        raise MoefyError(
            f"the model's FATReLU layers have {len(thresholds)} different thresholds; moefy "
            "saves one: set one threshold with relufy_(model, threshold)"
        )
    return {**base_marker(model, FORMAT_NAME, FORMAT_VERSION), "threshold": thresholds.pop()}


def _read(folder: Path) -> dict[str, Any]:
    record = read_marker(
        folder,
        MARKER_FILE,
        FORMAT_NAME,
        FORMAT_VERSION,
        ("threshold",),
        "it is not a folder of a relufied model; write one with moefy.save",
    )
    threshold = record["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise MoefyError(
            f"{folder / MARKER_FILE} has threshold {threshold!r}, not a number >= 0: "
            "save the model again"
        )
    return record


def _replay(model: nn.Module, record: dict[str, Any], header: Header, folder: Path) -> None:
    relufy_(model, float(record["threshold"]))


def _adopt(model: nn.Module) -> None:
    reapply_fatrelu(model)  # a FATReLU threshold recorded by relufy_ (no-op otherwise)


register_format(
    ChangeFormat(
        name=FORMAT_NAME,
        file=MARKER_FILE,
        rank=10,
        capture=_capture,
        read=_read,
        replay=_replay,
        adopt=_adopt,
        missing_hint="it is not a folder of a relufied model; write one with moefy.save",
    )
)
