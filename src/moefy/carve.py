"""Carve a dense model into a training-free MoE in one call: profile, split, fit a router.

The carved MoE (after CMoE, arXiv 2502.04416) has three parts per FFN layer:

- **shared experts**: the neurons most often among a token's largest activations, always run;
- **routed experts**: the other neurons, clustered into small experts by their activation
  patterns on calibration tokens (split method ``activation``);
- **a router fitted in closed form** on the same tokens (``analytic``: each expert scored by its
  representative neurons' real activations; ``lstsq``: a ridge fit of the experts' output norms);
  no gradient step anywhere.

:func:`carve_` runs the three steps (:func:`moefy.profile`, :func:`moefy.moe.moefy_`,
:func:`moefy.routing.train_routers`) with the settings of a :class:`CarveConfig`; each step is
also a public function of its own, and the same carve is ``moefy convert --shared ... --router``.
Choose how many experts run with :func:`moefy.moe.allocate_experts` (a per-layer budget of FFN
FLOPs) or :func:`moefy.routing.set_routing`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from moefy.errors import MoefyError, check_config
from moefy.jsonconfig import JsonConfig
from moefy.validate import check_fraction, check_int

if TYPE_CHECKING:
    from torch import nn

    from moefy.data.blocks import TokenBlocks
    from moefy.profiling import SparsityProfile

__all__ = ["CARVE_ROUTERS", "CarveConfig", "CarveReport", "carve_"]

CONFIG_VERSION = 1
# Routers a carve may fit without training; "oracle" keeps the oracle selector (a bound).
CARVE_ROUTERS = ("analytic", "lstsq", "oracle")


@dataclass(frozen=True)
class CarveConfig(JsonConfig):
    """How :func:`carve_` turns each dense FFN into a carved MoE.

    Attributes:
        expert_size: neurons per expert (S); small experts (8-16) keep most of the quality.
        shared: share of each layer's experts that always run (the most often active neurons),
            in [0, 1).
        method: split method of the routed neurons (``activation``: their activation patterns).
        router: ``lstsq`` (default: the best measured quality per FLOP on SmolLM2-135M),
            ``analytic`` (both fitted in closed form) or ``oracle`` (no router: the true expert
            norms choose; an upper bound, not a speed-up).
        top_share: a neuron is active for a token when among its ``top_share`` largest |h|.
        pattern_tokens: calibration tokens whose activation patterns the split clusters.
        seed: seed of the split.
        version: config format version.

    Example:
        >>> CarveConfig(expert_size=16, shared=0.25).router
        'lstsq'
    """

    expert_size: int = 8
    shared: float = 0.125
    method: str = "activation"
    router: str = "lstsq"
    top_share: float = 0.1
    pattern_tokens: int = 512
    seed: int = 0
    version: int = CONFIG_VERSION

    VERSION: ClassVar[int] = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.check_version()
        check_int("CarveConfig.expert_size", self.expert_size, minimum=1)
        check_fraction("CarveConfig.shared", self.shared)
        check_fraction("CarveConfig.top_share", self.top_share, zero=False, one=True)
        check_int("CarveConfig.pattern_tokens", self.pattern_tokens, minimum=1)
        check_int("CarveConfig.seed", self.seed)
        if self.router not in CARVE_ROUTERS:
            raise MoefyError(
                f"CarveConfig.router={self.router!r} is not one of {', '.join(CARVE_ROUTERS)} "
                "(a carve fits its router without training)"
            )
        self.moefy_config()  # the split settings are checked where they are defined

    def moefy_config(self) -> Any:
        """The :class:`moefy.moe.MoEfyConfig` of the split."""
        from moefy.moe import MoEfyConfig

        return MoEfyConfig(
            expert_size=self.expert_size, shared=self.shared, method=self.method, seed=self.seed
        )


@dataclass
class CarveReport:
    """What :func:`carve_` did.

    Attributes:
        config: the carve settings.
        n_tokens: calibration tokens profiled.
        seconds: wall time of each step (``profile``, ``split``, ``router``) and the ``total``.
        router: the router report (recall, norm share, router FLOPs), or None for ``oracle``.
    """

    config: CarveConfig
    n_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    router: Any = None


def carve_(
    model: nn.Module,
    data: TokenBlocks,
    config: CarveConfig | None = None,
    *,
    profile: SparsityProfile | None = None,
    progress: bool = False,
) -> CarveReport:
    """Turn ``model``'s dense FFNs into carved MoE layers, in place, with no training.

    Every expert runs until a selection is set, so the carved model first computes what the
    dense one did; then :func:`moefy.moe.allocate_experts` (a FLOPs budget) or
    :func:`moefy.routing.set_routing` chooses how many run.

    Args:
        model: a supported dense model (see :mod:`moefy.arch`).
        data: calibration token blocks (profiled, then the router's fitting tokens).
        config: the carve settings (default :class:`CarveConfig`).
        profile: a profile of this model with activation rates, to skip the profiling step.
        progress: show progress bars.

    Returns:
        A :class:`CarveReport` with the time of each step.

    Raises:
        MoefyError: the model is moefied already, a profile from another model or without
            activation rates, or a layer the settings cannot split.

    Example:
        >>> blocks = load_text("bbc-news").blocks(tokenizer, split="calibration", n_tokens=4096)
        >>> carve_(model, blocks, CarveConfig(expert_size=8, shared=0.125))
        >>> allocate_experts(model, blocks, keep=0.5)
    """
    from moefy.moe import moe_layers, moefy_

    config = config if config is not None else CarveConfig()
    check_config(config, CarveConfig)
    if moe_layers(model):
        raise MoefyError("the model is moefied already; carve the dense model")
    moefy_config = config.moefy_config()
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if profile is None:
        profile = _profile(model, data, config, progress)
    seconds["profile"] = time.perf_counter() - started
    mark = time.perf_counter()
    moefy_(model, moefy_config, profile=profile, progress=progress)
    seconds["split"] = time.perf_counter() - mark
    mark = time.perf_counter()
    router = None
    if config.router != "oracle":
        from moefy.routing import RouterConfig, train_routers

        router = train_routers(model, data, RouterConfig(router=config.router), progress=progress)
    seconds["router"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    return CarveReport(config=config, n_tokens=data.n_tokens, seconds=seconds, router=router)


def _profile(
    model: nn.Module, data: TokenBlocks, config: CarveConfig, progress: bool
) -> SparsityProfile:
    """Profile only what a carve reads: activation rates and patterns (no co-activation)."""
    from moefy.profiling import ProfileConfig, profile

    settings = ProfileConfig(
        top_share=config.top_share, pattern_tokens=config.pattern_tokens, progress=progress
    )
    return profile(model, data, settings)
