"""The router training config."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from moefy.errors import MoefyError
from moefy.jsonconfig import is_number, loads_json

CONFIG_VERSION = 1


@dataclass(frozen=True)
class RouterConfig:
    """How to build and train one router per MoE layer.

    Attributes:
        router: a key of :data:`moefy.routing.ROUTERS` (``mlp``, ``linear``, ``centroid``;
            ``centroid`` is built from the weights, not trained).
        hidden: hidden width H of the ``mlp`` router.
        loss: a key of :data:`moefy.routing.train.ROUTER_LOSSES`: ``listwise`` (cross-entropy
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
            model routed by the previous round's routers at ``report_fraction`` of experts.
        version: config format version.

    Example:
        >>> cfg = RouterConfig(router="mlp", hidden=128)
        >>> RouterConfig.from_json(cfg.to_json()) == cfg
        True
    """

    router: str = "mlp"
    hidden: int = 128
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

    def __post_init__(self) -> None:
        from moefy.routing.routers import ROUTERS
        from moefy.routing.train import ROUTER_LOSSES

        if self.router not in ROUTERS:
            raise MoefyError(
                f"RouterConfig.router={self.router!r} is unknown (known: {sorted(ROUTERS)}); "
                "add one with moefy.routing.register_router"
            )
        if self.loss not in ROUTER_LOSSES:
            raise MoefyError(
                f"RouterConfig.loss={self.loss!r} is unknown (known: {sorted(ROUTER_LOSSES)})"
            )
        for name in (
            "hidden",
            "tokens_per_layer",
            "epochs",
            "batch_size",
            "forward_batch_size",
            "rounds",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise MoefyError(f"RouterConfig.{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.seed):
            raise MoefyError(f"RouterConfig.seed must be an integer, got {self.seed!r}")
        if not is_number(self.lr) or self.lr <= 0:
            raise MoefyError(f"RouterConfig.lr must be > 0, got {self.lr!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise MoefyError(f"RouterConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not is_number(self.holdout_fraction) or not 0.0 < self.holdout_fraction < 1.0:
            raise MoefyError(
                f"RouterConfig.holdout_fraction must be in (0, 1), got {self.holdout_fraction!r}"
            )
        if not is_number(self.report_fraction) or not 0.0 < self.report_fraction <= 1.0:
            raise MoefyError(
                f"RouterConfig.report_fraction must be in (0, 1], got {self.report_fraction!r}"
            )
        if self.storage_dtype not in ("float32", "bfloat16", "float16"):
            raise MoefyError(
                "RouterConfig.storage_dtype must be float32, bfloat16 or float16, got "
                f"{self.storage_dtype!r}"
            )
        if self.version != CONFIG_VERSION:
            raise MoefyError(
                f"RouterConfig version {self.version!r} is not supported (this moefy reads "
                f"version {CONFIG_VERSION})"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(data, dict):
            raise MoefyError(f"RouterConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoefyError(f"RouterConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RouterConfig:
        """Rebuild a config from :meth:`to_json` output."""
        try:
            data = loads_json(text)
        except json.JSONDecodeError as err:
            raise MoefyError(f"RouterConfig: not valid JSON ({err})") from None
        return cls.from_dict(data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
