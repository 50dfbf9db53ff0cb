"""Measured expert use and FLOPs of a moefied model, from the MoE layers' selection tallies."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moefy.errors import MoefyError
from moefy.moe.convert import moe_layers


@dataclass(frozen=True)
class LayerFlops:
    """One MoE layer's measured use.

    Attributes:
        index: layer number.
        active_fraction: share of experts run per token.
        flops_per_token: FFN FLOPs per token spent (see :mod:`moefy.moe.flops`).
        dense_flops_per_token: FLOPs per token of the dense FFN it replaced.
    """

    index: int
    active_fraction: float
    flops_per_token: float
    dense_flops_per_token: float


@dataclass(frozen=True)
class FlopsReport:
    """Measured expert use and FFN FLOPs over all MoE layers since the last tally reset.

    Attributes:
        active_fraction: mean over layers of the share of experts run per token.
        flops_per_token: FFN FLOPs per token spent, summed over MoE layers.
        dense_flops_per_token: the same FFNs' dense FLOPs per token.
        layers: per-layer figures.
    """

    active_fraction: float
    flops_per_token: float
    dense_flops_per_token: float
    layers: tuple[LayerFlops, ...]

    @property
    def flops_ratio(self) -> float:
        """Spent over dense FFN FLOPs."""
        return self.flops_per_token / self.dense_flops_per_token


def flops_report(model: nn.Module) -> FlopsReport:
    """Measured active fraction and FFN FLOPs of a moefied model since the last reset.

    Args:
        model: a moefied model that has run at least one forward since ``reset_tally``.

    Returns:
        A :class:`FlopsReport`.

    Raises:
        MoefyError: no MoE layers, or no tokens seen yet.

    Example:
        >>> reset_tally(model); model(**batch)
        >>> flops_report(model).active_fraction
        0.25
    """
    layers = moe_layers(model)
    if not layers:
        raise MoefyError("the model has no MoE layers; call moefy_ first")
    rows = tuple(
        LayerFlops(
            index=moe.layer_index,
            active_fraction=moe.active_fraction,
            flops_per_token=moe.flops_per_token(),
            dense_flops_per_token=moe.dense_flops_per_token(),
        )
        for moe in layers
    )
    return FlopsReport(
        active_fraction=sum(r.active_fraction for r in rows) / len(rows),
        flops_per_token=sum(r.flops_per_token for r in rows),
        dense_flops_per_token=sum(r.dense_flops_per_token for r in rows),
        layers=rows,
    )
