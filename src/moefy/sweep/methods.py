"""The sweep's methods: each turns the user's model into the one to evaluate at a level.

A method is one :class:`SweepMethod` in :data:`METHODS` (add one with :func:`register_method`):
its family, what its level means, its default levels and a ``prepare(context, level)`` that
returns a fresh model. The level of every FFN method is the share of the FFN it keeps (the
fraction of experts, or one minus the target sparsity), so ``--levels 0.5,0.25`` means the same
budget for every method; ``moe-dynk`` takes DSTI's tau, layer methods a number of layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.jsonconfig import is_number

KEPT_SHARE = "kept share of the FFN"
# methods that read trained routers from SweepConfig.routed
ROUTED_METHODS = ("moe-mlp", "moe-linear", "moe-dynk")


@dataclass
class SweepContext:
    """What the methods need to build their models; loaded once per sweep.

    Attributes:
        model: the dense model's name or folder (anything ``load_model`` takes).
        calibration: calibration blocks for methods that calibrate (thresholds).
        moe: folder of a moefied model (``moefy convert``), or None to split on the fly.
        routed: folder of a moefied model with trained routers (``moefy train-routers``).
        experts: experts per layer when the sweep splits on the fly.
        device, dtype: where every model is loaded, and its weight dtype.
        cache: moefied models built on the fly, by folder, so each is built once.
        calibrations: each threshold method's calibration statistics, reused across its levels
            (the dense pass runs once; the greedy search once for the sparsest level first).
    """

    model: str
    calibration: TokenBlocks | None = None
    moe: str | None = None
    routed: str | None = None
    experts: int = 64
    device: Any = "cpu"
    dtype: Any = "fp32"
    cache: dict[str, Any] | None = None
    calibrations: dict[str, Any] = field(default_factory=dict)

    def load_dense(self) -> nn.Module:
        """A fresh copy of the dense model."""
        from moefy.models.load import load_model

        return load_model(self.model, dtype=self.dtype, device=self.device)[0]

    def load_moe(self) -> nn.Module:
        """A fresh moefied model: from ``moe`` (or ``routed``), or split now with ``params``."""
        from moefy.models.load import load_model

        folder = self.moe or self.routed
        if folder is not None:
            return load_model(folder, dtype=self.dtype, device=self.device)[0]
        return self._split_on_the_fly()

    def _split_on_the_fly(self) -> nn.Module:
        import copy

        from moefy.moe import MoEfyConfig, moefy_

        self.cache = self.cache if self.cache is not None else {}
        if "moe" not in self.cache:
            model = self.load_dense()
            moefy_(model, MoEfyConfig(num_experts=self.experts, method="params"))
            self.cache["moe"] = model
        return copy.deepcopy(self.cache["moe"])

    def load_routed(self) -> nn.Module:
        """A fresh moefied model with trained routers (needs ``routed``)."""
        from moefy.models.load import load_model

        if self.routed is None:
            raise MoefyError(
                "router methods need a model with trained routers: pass --routed (a folder made "
                "by moefy train-routers)"
            )
        return load_model(self.routed, dtype=self.dtype, device=self.device)[0]


@dataclass(frozen=True)
class SweepMethod:
    """One method of the sweep.

    Attributes:
        name: method name on the command line (``teal``).
        family: ``dense``, ``moe``, ``threshold`` or ``layers``.
        level_meaning: what a level is, for tables and plots.
        default_levels: levels used when the user gives none; empty for ``dense``.
        prepare: ``(context, level) -> model`` ready to evaluate.
        uses_shared_levels: ``--levels`` applies (a kept share); else only per-method levels.
        check_level: ``level -> None``, raising :class:`MoefyError` for a level the method
            cannot take; :class:`moefy.sweep.SweepConfig` calls it before any model is loaded.
            None: only ``prepare`` checks.
    """

    name: str
    family: str
    level_meaning: str
    default_levels: tuple[float, ...]
    prepare: Callable[[SweepContext, float | None], nn.Module]
    uses_shared_levels: bool = True
    check_level: Callable[[float | None], None] | None = None


METHODS: dict[str, SweepMethod] = {}


def register_method(method: SweepMethod, *, overwrite: bool = False) -> None:
    """Add a method to the sweep (a name already taken needs ``overwrite=True``)."""
    if method.name in METHODS and not overwrite:
        raise MoefyError(f"sweep method {method.name!r} exists already; pass overwrite=True")
    METHODS[method.name] = method


def _check_share(level: float | None, method: str) -> float:
    if not is_number(level) or not 0.0 < level <= 1.0:
        raise MoefyError(f"{method}: a level is the kept share of the FFN, in (0, 1], got {level}")
    return float(level)


def _share_check(method: str) -> Callable[[float | None], None]:
    def check(level: float | None) -> None:
        _check_share(level, method)

    return check


def _check_tau(level: float | None) -> None:
    if not is_number(level) or not 0.0 < level <= 1.0:
        raise MoefyError(f"moe-dynk: a level is tau in (0, 1], got {level}")


def _layer_check(kind: str) -> Callable[[float | None], None]:
    def check(level: float | None) -> None:
        whole = is_number(level) and math.isfinite(level) and int(level) == level
        if not whole or level < 0:
            raise MoefyError(f"{kind}: a level is a whole number of layers, got {level}")

    return check


def _dense(context: SweepContext, level: float | None) -> nn.Module:
    return context.load_dense()


def _moe_oracle(context: SweepContext, level: float | None) -> nn.Module:
    from moefy.moe import set_selection
    from moefy.moe.convert import moe_layers
    from moefy.moe.selectors import OracleSelector

    share = _check_share(level, "moe-oracle")
    model = context.load_moe()
    for moe in moe_layers(model):
        if not isinstance(moe.selector, OracleSelector):
            moe.selector = OracleSelector(moe.num_experts)
    set_selection(model, fraction=share)
    return model


def _moe_router(router: str) -> Callable[[SweepContext, float | None], nn.Module]:
    def prepare(context: SweepContext, level: float | None) -> nn.Module:
        from moefy.moe.convert import moe_layers
        from moefy.routing import attach_routers, set_routing

        share = _check_share(level, f"moe-{router}")
        if router == "centroid":  # built from the weights: no training, no routed folder needed
            model = context.load_moe()
            attach_routers(model, "centroid")
        else:
            model = context.load_routed()
            kinds = {type(moe.selector).__name__.lower() for moe in moe_layers(model)}
            if not any(router in kind for kind in kinds):
                raise MoefyError(
                    f"moe-{router}: the routed model at {context.routed} has {sorted(kinds)} "
                    f"selectors; train {router} routers with moefy train-routers --router {router}"
                )
        set_routing(model, "topk", fraction=share)
        return model

    return prepare


def _moe_dynamic(context: SweepContext, level: float | None) -> nn.Module:
    from moefy.routing import set_routing

    _check_tau(level)
    model = context.load_routed()
    set_routing(model, "dynamic", tau=float(level))
    return model


def _threshold_config(method: str, level: float | None) -> Any:
    """The sparsify config of a threshold method at a level (its kept share)."""
    from moefy.sparsify import config_from_dict

    share = _check_share(level, method)
    return config_from_dict({"method": method, "sparsity": round(1.0 - share, 6)})


def _threshold_check(method: str) -> Callable[[float | None], None]:
    def check(level: float | None) -> None:
        _threshold_config(method, level)

    return check


def _threshold(method: str) -> Callable[[SweepContext, float | None], nn.Module]:
    def prepare(context: SweepContext, level: float | None) -> nn.Module:
        from moefy.sparsify import sparsify_

        config = _threshold_config(method, level)
        if config.needs_calibration and context.calibration is None:
            raise MoefyError(f"{method} needs calibration text")
        model = context.load_dense()
        report = sparsify_(
            model,
            config,
            context.calibration if config.needs_calibration else None,
            calibration=context.calibrations.get(method),
        )
        if report.calibration is not None:
            context.calibrations[method] = report.calibration
        return model

    return prepare


def _register_builtins() -> None:
    register_method(SweepMethod("dense", "dense", "", (), _dense, uses_shared_levels=False))
    for name in ("moe-oracle", "moe-mlp", "moe-linear", "moe-centroid"):
        prepare = _moe_oracle if name == "moe-oracle" else _moe_router(name.removeprefix("moe-"))
        register_method(
            SweepMethod(
                name, "moe", KEPT_SHARE, (0.5, 0.25, 0.125), prepare, check_level=_share_check(name)
            )
        )
    register_method(
        SweepMethod(
            "moe-dynk",
            "moe",
            "tau (DSTI)",
            (0.9, 0.8),
            _moe_dynamic,
            uses_shared_levels=False,
            check_level=_check_tau,
        )
    )
    for method in ("teal", "cats", "chess", "wina", "topk"):
        register_method(
            SweepMethod(
                method,
                "threshold",
                KEPT_SHARE,
                (0.75, 0.5, 0.35),
                _threshold(method),
                check_level=_threshold_check(method),
            )
        )


_register_builtins()


def method_names() -> list[str]:
    """Every registered method, layer methods included when that package is present."""
    _register_layer_methods()
    return list(METHODS)


def get_method(name: str) -> SweepMethod:
    """The method called ``name``; a one-line error naming the known ones otherwise."""
    _register_layer_methods()
    method = METHODS.get(name)
    if method is None:
        raise MoefyError(f"unknown sweep method {name!r}; known: {', '.join(METHODS)}")
    return method


def _register_layer_methods() -> None:
    """Layer dropping and skipping (``moefy.layers``), registered on first use."""
    if "drop-attn" in METHODS:
        return
    try:
        from moefy.layers import apply_layer_method
    except ImportError:
        return

    def layer_method(kind: str) -> Callable[[SweepContext, float | None], nn.Module]:
        def prepare(context: SweepContext, level: float | None) -> nn.Module:
            _layer_check(kind)(level)
            model = context.load_dense()
            apply_layer_method(model, kind, int(level), calibration=context.calibration)
            return model

        return prepare

    for kind in ("drop-attn", "drop-mlp", "drop-block", "skip"):
        register_method(
            SweepMethod(
                kind,
                "layers",
                "layers removed",
                (2, 4, 8),
                layer_method(kind),
                uses_shared_levels=False,
                check_level=_layer_check(kind),
            )
        )


def describe(path: str | Path | None) -> str | None:
    """A folder as a string, for cache keys (None stays None)."""
    return None if path is None else str(Path(path).resolve())
