"""The sweep's methods: each turns the user's model into the one to evaluate at a level.

A method is one :class:`SweepMethod` in :data:`METHODS` (add one with :func:`register_method`):
its family, what its level means, its default levels and a ``prepare(context, level)`` that
returns a fresh model. Every training-free method registered with
:func:`moefy.sparsify.methods.register_sparsify_method` is a ``threshold`` method here too, read
from that registry on each lookup (none is named in this module), and every layer method of
:data:`moefy.layers.LAYER_METHODS` a ``layers`` method. The level of every FFN method is its
keep, the share of the FFN it keeps per token (the share of experts, or one minus a threshold
method's target sparsity, see :func:`moefy.sparsify.config.sparsity_for_keep`), so
``--levels 0.5,0.25`` means the same budget for every method; ``moe-dynk`` takes DSTI's tau,
layer methods a number of layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moefy.errors import MoefyError
from moefy.jsonconfig import is_number
from moefy.registry import Entry, Registry

if TYPE_CHECKING:
    from torch import nn

    from moefy.data.blocks import TokenBlocks

# what the level of an FFN method is, in tables, plots and rows
KEEP = "keep (share of the FFN kept)"
KEPT_SHARE = KEEP  # its former name
LAYER_LEVELS = "layers removed"
# default levels of a layer method that declares none (its entry's ``meta["sweep_levels"]``)
DEFAULT_LAYER_LEVELS = (2, 4, 8)
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
        carved: folder of a carved model (``moefy convert --shared ... --router analytic``), or
            None to carve the dense model on the calibration text (:func:`moefy.carve.carve_`).
        experts: experts per layer when the sweep splits on the fly.
        device, dtype: where every model is loaded, and its weight dtype.
        cache: moefied models built on the fly, by folder, so each is built once.
        calibrations: each threshold method's calibration statistics, reused across its levels
            (the dense pass runs once; the greedy search once for the sparsest level first).
        progress: show the threshold methods' calibration progress (its passes and the greedy
            allocation), which can take minutes before a method's row appears.
    """

    model: str
    calibration: TokenBlocks | None = None
    moe: str | None = None
    routed: str | None = None
    carved: str | None = None
    experts: int = 64
    device: Any = "cpu"
    dtype: Any = "fp32"
    cache: dict[str, Any] | None = None
    calibrations: dict[str, Any] = field(default_factory=dict)
    progress: bool = False

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

    def load_carved(self) -> nn.Module:
        """A fresh carved model: from ``carved``, or carved now on the calibration text."""
        import copy

        from moefy.models.load import load_model

        if self.carved is not None:
            return load_model(self.carved, dtype=self.dtype, device=self.device)[0]
        if self.calibration is None:
            raise MoefyError("carving needs calibration text (or pass --carved, a carved model)")
        self.cache = self.cache if self.cache is not None else {}
        if "carved" not in self.cache:
            from moefy.carve import carve_

            model = self.load_dense()
            carve_(model, self.calibration)
            self.cache["carved"] = model
        return copy.deepcopy(self.cache["carved"])

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
        uses_shared_levels: ``--levels`` applies (a keep); else only per-method levels.
        check_level: ``level -> None``, raising :class:`MoefyError` for a level the method
            cannot take; :class:`moefy.sweep.SweepConfig` calls it before any model is loaded.
            None: only ``prepare`` checks.
        in_default: ``moefy sweep`` runs it when no ``--methods`` are given.
        deployable: a way to run a model faster; False for bounds such as the oracle, which
            computes every expert to choose some (the report's headline leaves them out).
        calibrates: reads the sweep's calibration text (its results depend on
            ``calibration_tokens``).
    """

    name: str
    family: str
    level_meaning: str
    default_levels: tuple[float, ...]
    prepare: Callable[[SweepContext, float | None], nn.Module]
    uses_shared_levels: bool = True
    check_level: Callable[[float | None], None] | None = None
    in_default: bool = False
    deployable: bool = True
    calibrates: bool = False


def _register_builtins() -> None:
    _register_model_methods()
    _sync_registered()


# method name -> SweepMethod; the built-ins register on the first lookup.
METHODS: Registry[SweepMethod] = Registry("sweep method", load=_register_builtins)


def register_method(method: SweepMethod, *, overwrite: bool = False) -> None:
    """Add a method to the sweep (a name already taken needs ``overwrite=True``).

    Example:
        >>> register_method(SweepMethod("half", "moe", KEEP, (0.5,), prepare_half))
    """
    METHODS.register(method.name, method, help=method.level_meaning, overwrite=overwrite)


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
    set_selection(model, keep=share)
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
        set_routing(model, "topk", keep=share)
        return model

    return prepare


def _moe_carved(oracle: bool) -> Callable[[SweepContext, float | None], nn.Module]:
    """The carved MoE with its own router (or the oracle of the same experts), with experts
    allocated per layer so the model's FFN FLOPs, routers included, are the level's share."""

    def prepare(context: SweepContext, level: float | None) -> nn.Module:
        from moefy.moe.budget import allocate_experts
        from moefy.moe.convert import moe_layers
        from moefy.moe.selectors import OracleSelector

        name = "moe-carved-oracle" if oracle else "moe-carved"
        share = _check_share(level, name)
        model = context.load_carved()
        if oracle:
            for moe in moe_layers(model):
                moe.selector = OracleSelector(moe.num_experts)
        if context.calibration is None:
            raise MoefyError(f"{name} allocates experts per layer on calibration text")
        curves = context.calibrations.get(name)  # measured once, for every level
        report = allocate_experts(model, context.calibration, share, curves=curves)
        context.calibrations[name] = report.errors
        return model

    return prepare


def _moe_dynamic(context: SweepContext, level: float | None) -> nn.Module:
    from moefy.routing import set_routing

    _check_tau(level)
    model = context.load_routed()
    set_routing(model, "dynamic", tau=float(level))
    return model


def split_variant(name: str) -> tuple[str, dict[str, Any]]:
    """``teal:attention=true`` -> ``("teal", {"attention": True})`` (see
    :func:`moefy.sparsify.config.split_method_spec`)."""
    from moefy.sparsify.config import split_method_spec

    return split_method_spec(name)


def threshold_config(method: str, level: float | None) -> Any:
    """The sparsify config of a threshold method (or a variant of one, see
    :func:`split_variant`) at a level (its keep)."""
    from moefy.sparsify.config import config_from_spec, sparsity_for_keep

    keep = _check_share(level, method)
    return config_from_spec(method, sparsity=sparsity_for_keep(keep))


def _threshold_check(method: str) -> Callable[[float | None], None]:
    def check(level: float | None) -> None:
        threshold_config(method, level)

    return check


def _threshold(method: str) -> Callable[[SweepContext, float | None], nn.Module]:
    def prepare(context: SweepContext, level: float | None) -> nn.Module:
        from moefy.sparsify import sparsify_

        config = threshold_config(method, level)
        if config.needs_calibration and context.calibration is None:
            raise MoefyError(f"{method} needs calibration text")
        model = context.load_dense()
        report = sparsify_(
            model,
            config,
            context.calibration if config.needs_calibration else None,
            calibration=context.calibrations.get(method),
            progress=context.progress,
        )
        if report.calibration is not None:
            context.calibrations[method] = report.calibration
        return model

    return prepare


def _register_model_methods() -> None:
    """Dense and the MoE methods (oracle, routers, dynamic-k)."""
    register_method(
        SweepMethod("dense", "dense", "", (), _dense, uses_shared_levels=False, in_default=True)
    )
    for name in ("moe-oracle", "moe-mlp", "moe-linear", "moe-centroid"):
        oracle = name == "moe-oracle"
        prepare = _moe_oracle if oracle else _moe_router(name.removeprefix("moe-"))
        register_method(
            SweepMethod(
                name,
                "moe",
                KEEP,
                (0.5, 0.25, 0.125),
                prepare,
                check_level=_share_check(name),
                in_default=oracle,
                deployable=not oracle,
            )
        )
    for name in ("moe-carved", "moe-carved-oracle"):
        oracle = name.endswith("oracle")
        register_method(
            SweepMethod(
                name,
                "moe",
                KEEP,
                (0.5, 0.25),
                _moe_carved(oracle),
                check_level=_share_check(name),
                deployable=not oracle,
                calibrates=True,
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


def _sync(source: str, entries: list[Entry], build: Callable[[Entry], SweepMethod]) -> None:
    """Make the sweep's methods from another registry (``source`` marks them) its entries: add
    the new ones, drop the ones unregistered there since. A sweep method registered first under
    the same name stays."""
    names = {entry.name for entry in entries}
    for entry in METHODS.entries():
        if entry.meta.get(source) and entry.name not in names:
            METHODS.unregister(entry.name)
    for entry in entries:
        if entry.name not in METHODS:
            METHODS.register(entry.name, build(entry), help=entry.help, **{source: True})


def _sync_threshold_methods() -> None:
    """The registered sparsify methods, as ``threshold`` methods with the levels they declared."""
    from moefy.sparsify.config import SPARSIFY_METHODS

    def build(entry: Entry) -> SweepMethod:
        return SweepMethod(
            entry.name,
            "threshold",
            KEEP,
            entry.meta["sweep_levels"],
            _threshold(entry.name),
            check_level=_threshold_check(entry.name),
            in_default=True,
            calibrates=True,
        )

    _sync("from_sparsify", SPARSIFY_METHODS.entries(), build)


def _sync_layer_methods() -> None:
    """Every layer method of :data:`moefy.layers.LAYER_METHODS` (dropping and skipping), with
    its help and levels (``meta["sweep_levels"]``, else :data:`DEFAULT_LAYER_LEVELS`) from its
    entry, when that package is present."""
    try:
        from moefy.layers import LAYER_METHODS
    except ImportError:
        return

    def build(entry: Entry) -> SweepMethod:
        return SweepMethod(
            entry.name,
            "layers",
            LAYER_LEVELS,
            tuple(entry.meta.get("sweep_levels", DEFAULT_LAYER_LEVELS)),
            _layer_method(entry.name),
            uses_shared_levels=False,
            check_level=_layer_check(entry.name),
            calibrates=True,
        )

    _sync("from_layers", LAYER_METHODS.entries(), build)


def _sync_registered() -> None:
    _sync_threshold_methods()
    _sync_layer_methods()


def method_names() -> list[str]:
    """Every registered method, layer methods included when that package is present."""
    _sync_registered()
    return METHODS.names()


def default_method_names() -> list[str]:
    """The methods ``moefy sweep`` runs when given none: dense, the oracle and every
    training-free sparsify method."""
    return [name for name in method_names() if METHODS.get(name).value.in_default]


def get_method(name: str) -> SweepMethod:
    """The method called ``name``; a one-line error naming a close match and the known ones.

    A threshold method with config fields set, ``teal:attention=true``, is a method of its own
    (its calibration, rows and curve are kept apart from plain ``teal``'s).
    """
    from moefy.sparsify.config import SPEC_SEPARATOR

    _sync_registered()
    if SPEC_SEPARATOR not in name:
        return METHODS.get(name).value
    base = METHODS.get(split_variant(name)[0]).value
    if base.family != "threshold":
        raise MoefyError(
            f"{name!r}: only the training-free (threshold) methods take config fields after "
            f"{SPEC_SEPARATOR!r}, and {base.name} is a {base.family} method"
        )
    threshold_config(name, base.default_levels[0])  # unknown fields and bad values fail now
    return dataclasses.replace(
        base,
        name=name,
        prepare=_threshold(name),
        check_level=_threshold_check(name),
        in_default=False,
    )


def _layer_method(kind: str) -> Callable[[SweepContext, float | None], nn.Module]:
    def prepare(context: SweepContext, level: float | None) -> nn.Module:
        from moefy.layers import apply_layer_method

        _layer_check(kind)(level)
        model = context.load_dense()
        apply_layer_method(model, kind, int(level), calibration=context.calibration)
        return model

    return prepare


def describe(path: str | Path | None) -> str | None:
    """A folder as a string, for cache keys (None stays None)."""
    return None if path is None else str(Path(path).resolve())
