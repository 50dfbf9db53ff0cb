"""What router training reports: per layer, how well the router finds the experts that matter."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerRouterReport:
    """Router quality of one MoE layer, on held-out calibration tokens.

    Attributes:
        layer: layer index.
        experts_selected: k, the top-k size the figures are measured at.
        recall: mean share of each token's true top-k experts that the router's top-k holds.
        untrained_recall: the same for the router before training (equal for ``centroid``).
        random_recall: the expected recall of a random choice, k / E.
        norm_share: mean share of the true output norm (sum over experts) carried by the
            router's top-k.
        oracle_norm_share: the same for the true top-k (the best possible).
        router_flops: router FLOPs per token.
        saved_flops: expert FLOPs per token saved by running k of E experts.
        final_loss: mean training loss of the last epoch (nan when not trained).
        n_train, n_holdout: tokens trained on and reported on.
    """

    layer: int
    experts_selected: int
    recall: float
    untrained_recall: float
    random_recall: float
    norm_share: float
    oracle_norm_share: float
    router_flops: float
    saved_flops: float
    final_loss: float
    n_train: int
    n_holdout: int

    @property
    def router_cost_share(self) -> float:
        """Router FLOPs as a share of the expert FLOPs it saves."""
        return self.router_flops / self.saved_flops if self.saved_flops else float("inf")


@dataclass(frozen=True)
class RouterReport:
    """Router training result of a whole model.

    Attributes:
        router: router type.
        config: the :class:`RouterConfig` as a dict.
        layers: one :class:`LayerRouterReport` per MoE layer, in layer order.
        n_tokens: calibration tokens seen (all ranks).
        seconds: wall time of collection and training.
    """

    router: str
    config: dict[str, Any]
    layers: list[LayerRouterReport] = field(default_factory=list)
    n_tokens: int = 0
    seconds: float = 0.0

    @property
    def mean_recall(self) -> float:
        return sum(r.recall for r in self.layers) / max(1, len(self.layers))

    @property
    def mean_norm_share(self) -> float:
        return sum(r.norm_share for r in self.layers) / max(1, len(self.layers))

    @property
    def router_cost_share(self) -> float:
        """Router FLOPs of all layers over the expert FLOPs they save."""
        saved = sum(r.saved_flops for r in self.layers)
        return sum(r.router_flops for r in self.layers) / saved if saved else float("inf")

    def rows(self) -> list[dict[str, Any]]:
        """One display row per layer (for ``print_table``)."""
        return [
            {
                "layer": r.layer,
                "k": r.experts_selected,
                "recall": r.recall,
                "untrained": r.untrained_recall,
                "random": r.random_recall,
                "norm share": r.norm_share,
                "oracle share": r.oracle_norm_share,
                "router/saved FLOPs %": 100 * r.router_cost_share,
                "loss": r.final_loss,
            }
            for r in self.layers
        ]

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return dataclasses.asdict(self)
