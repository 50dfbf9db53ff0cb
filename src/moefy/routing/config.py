"""The router training config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moefy.errors import MoefyError
from moefy.jsonconfig import JsonConfig
from moefy.validate import check_choice, check_fraction, check_int, check_number

CONFIG_VERSION = 1
# dtypes the collected router inputs may be stored in
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
# settings that count something: integers >= 1
_COUNTS = (
    "hidden",
    "representatives",
    "tokens_per_layer",
    "epochs",
    "batch_size",
    "forward_batch_size",
    "rounds",
)
# Representative neurons per expert of the ``analytic`` router (CMoE uses a handful).
DEFAULT_REPRESENTATIVES = 2
# Ridge strength of the ``lstsq`` router, relative to the mean diagonal of the centred X^T X.
DEFAULT_RIDGE = 1e-3


@dataclass(frozen=True)
class RouterConfig(JsonConfig):
    """How to build and train one router per MoE layer.

    Attributes:
        router: a key of :data:`moefy.routing.ROUTERS` (``mlp``, ``linear``, ``centroid``,
            ``analytic``, ``lstsq``; ``centroid`` is built from the weights, ``analytic`` and
            ``lstsq`` are fitted in closed form, the others trained).
        hidden: hidden width H of the ``mlp`` router.
        representatives: representative neurons per expert of the ``analytic`` router (at
            most the expert size).
        ridge: ridge strength of the ``lstsq`` router, relative to the mean diagonal of the
            centred X^T X (>= 0).
        loss: a key of :data:`moefy.routing.losses.ROUTER_LOSSES`: ``listwise`` (cross-entropy
            of the predicted against the true share of each expert in the token's total norm;
            only order and shares matter for selection) or ``mse`` (regression of log norms).
        tokens_per_layer: size of the bounded sample of (input, true norms) pairs kept per
            layer (over all ranks); calibration tokens beyond it are reservoir-sampled.
        epochs: passes over each layer's reservoir.
        batch_size: tokens per optimiser step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        holdout_fraction: share of each reservoir held out of training and used for the report.
        report_fraction: share of experts whose true top-k the report's recall is measured on.
        forward_batch_size: blocks per forward pass while collecting.
        storage_dtype: dtype of the stored router inputs (``bfloat16`` halves the memory).
        seed: seed of initialisation, shuffling and reservoir sampling (same on every rank).
        rounds: collection-and-training rounds; rounds after the first collect the inputs of the
            model routed by the previous round's routers at ``report_fraction`` of experts
            (closed-form routers are fitted once).
        version: config format version.

    Example:
        >>> cfg = RouterConfig(router="mlp", hidden=128)
        >>> RouterConfig.from_json(cfg.to_json()) == cfg
        True
    """

    router: str = "mlp"
    hidden: int = 128
    representatives: int = DEFAULT_REPRESENTATIVES
    ridge: float = DEFAULT_RIDGE
    loss: str = "listwise"
    tokens_per_layer: int = 16384
    epochs: int = 8
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    holdout_fraction: float = 0.1
    report_fraction: float = 0.25
    forward_batch_size: int = 8
    storage_dtype: str = "bfloat16"
    seed: int = 0
    rounds: int = 1
    version: int = CONFIG_VERSION

    VERSION: ClassVar[int] = CONFIG_VERSION

    def __post_init__(self) -> None:
        from moefy.routing.losses import ROUTER_LOSSES
        from moefy.routing.routers import ROUTERS

        if self.router not in ROUTERS:
            raise MoefyError(
                f"RouterConfig.router={self.router!r} is unknown (known: {sorted(ROUTERS)}); "
                "add one with moefy.routing.register_router"
            )
        if self.loss not in ROUTER_LOSSES:
            raise MoefyError(
                f"RouterConfig.loss={self.loss!r} is unknown (known: {sorted(ROUTER_LOSSES)})"
            )
        for name in _COUNTS:
            check_int(f"RouterConfig.{name}", getattr(self, name), minimum=1)
        check_int("RouterConfig.seed", self.seed)
        check_number("RouterConfig.lr", self.lr, above=0.0)
        check_number("RouterConfig.weight_decay", self.weight_decay, minimum=0.0)
        check_number("RouterConfig.ridge", self.ridge, minimum=0.0)
        check_fraction("RouterConfig.holdout_fraction", self.holdout_fraction, zero=False)
        check_fraction("RouterConfig.report_fraction", self.report_fraction, zero=False, one=True)
        check_choice("RouterConfig.storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        self.check_version()
