"""Configuration of the activation-sparsity profiler.

One frozen dataclass, validated on construction, with a ``version`` field and a JSON round trip
(:class:`moefy.jsonconfig.JsonConfig`'s ``to_dict`` / ``from_dict``), so the CLI, a recipe file and
Python build the same object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from moefy.errors import MoefyError
from moefy.jsonconfig import JsonConfig
from moefy.validate import check_bool, check_choice, check_fraction, check_int, check_number

PROFILE_CONFIG_VERSION = 1

# What makes a neuron "active" for a token; the statistics for each rule live in
# ``moefy.profiling.accumulators.ACTIVE_RULES`` (same keys).
ACTIVE_RULE_NAMES = ("contribution", "nonzero", "magnitude")


@dataclass(frozen=True)
class ProfileConfig(JsonConfig):
    """How :func:`moefy.profiling.profile` measures activation sparsity.

    Notation: h is the (F,) vector of neuron activations of one token (the input of the down
    projection), ``c_i = |h_i| * ||W_down[:, i]||`` the size of neuron i's contribution to the
    FFN output.

    Attributes:
        batch_size: token blocks per forward pass.
        shares: contribution shares p; for each, the profile reports the mean (over tokens)
            fraction of neurons in the smallest set whose ``c`` carries ``p * sum(c)``.
        rms_thresholds: multiples t of the layer's activation RMS; the profile reports the
            fraction of |h| below ``t * RMS``.
        active_rule: what makes a neuron active for a token:
            ``"contribution"``: it is in the smallest set carrying ``active_share`` of
            ``sum(c)`` (ties at the cut-off are all active); ``"nonzero"``: ``h_i != 0`` (ReLU
            models); ``"magnitude"``: ``|h_i| > active_threshold * rms(h)``, with rms over the
            same token's F activations (so the rule needs no calibration pass).
        active_share: the share p of the ``"contribution"`` rule.
        active_threshold: the multiple t of the ``"magnitude"`` rule.
        chunk_sizes: n for chunk-level sparsity: the fraction of neurons active for at least one
            of n consecutive tokens, over non-overlapping chunks starting at each block's first
            token (an incomplete last chunk is skipped).
        hot_share: hot neurons are the smallest set of neurons that carries this share of all
            activations (firing events) of a layer.
        num_hot: how many of the most frequently active neuron ids to keep per layer.
        coactivation: also count, per layer, how often each pair of neurons is active together
            (an F x F float64 matrix per layer, written to ``coactivation.safetensors``).
        top_share: p of the activation rates: a neuron is "top" for a token when its |h| is
            among the token's ``ceil(p * F)`` largest (ties at the cut-off are all top; a
            neuron with h = 0 never is). Its activation rate is the share of tokens for which
            it is top.
        pattern_tokens: T, how many profiled tokens (evenly spaced, the same for every layer)
            keep each neuron's contribution share ``c_i / sum(c)`` as its activation pattern,
            an (F, T) array per layer; 0 stores none.
        progress: show a progress bar (on rank 0 only).
        version: config schema version; a newer version than this moefy knows is refused.

    Example:
        >>> config = ProfileConfig(batch_size=4, active_rule="nonzero", coactivation=True)
        >>> ProfileConfig.from_dict(config.to_dict()) == config
        True
    """

    batch_size: int = 8
    shares: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)
    rms_thresholds: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5)
    active_rule: str = "contribution"
    active_share: float = 0.9
    active_threshold: float = 0.1
    chunk_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    hot_share: float = 0.8
    num_hot: int = 32
    coactivation: bool = False
    top_share: float = 0.1
    pattern_tokens: int = 512
    progress: bool = False
    version: int = PROFILE_CONFIG_VERSION

    VERSION: ClassVar[int] = PROFILE_CONFIG_VERSION

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: normalise in place once, here
        set_field(self, "shares", _sorted_unique(self.shares, "shares", float))
        set_field(
            self, "rms_thresholds", _sorted_unique(self.rms_thresholds, "rms_thresholds", float)
        )
        set_field(self, "chunk_sizes", _sorted_unique(self.chunk_sizes, "chunk_sizes", int))
        check_int("ProfileConfig.batch_size", self.batch_size, minimum=1)
        check_int("ProfileConfig.num_hot", self.num_hot, minimum=0)
        for p in self.shares:
            check_fraction("ProfileConfig.shares", p, zero=False)
        for t in self.rms_thresholds:
            if not (math.isfinite(t) and t > 0):
                raise MoefyError(f"ProfileConfig.rms_thresholds must be > 0, got {t}")
        for n in self.chunk_sizes:
            check_int("ProfileConfig.chunk_sizes", n, minimum=1)
        check_choice("ProfileConfig.active_rule", self.active_rule, ACTIVE_RULE_NAMES)
        check_fraction("ProfileConfig.active_share", self.active_share, zero=False)
        check_fraction("ProfileConfig.hot_share", self.hot_share, zero=False)
        check_number("ProfileConfig.active_threshold", self.active_threshold, minimum=0.0)
        check_fraction("ProfileConfig.top_share", self.top_share, zero=False, one=True)
        check_int("ProfileConfig.pattern_tokens", self.pattern_tokens, minimum=0)
        for flag in ("coactivation", "progress"):
            check_bool(f"ProfileConfig.{flag}", getattr(self, flag))
        self.check_version()


def _sorted_unique(values: Any, name: str, kind: type) -> tuple:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise MoefyError(f"ProfileConfig.{name} must be a list of numbers, got {values!r}")
    values = tuple(values)
    if not values:
        raise MoefyError(f"ProfileConfig.{name} is empty: give at least one value")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MoefyError(f"ProfileConfig.{name} must hold numbers, got {value!r}")
        if kind is int and value != int(value):
            raise MoefyError(f"ProfileConfig.{name} must hold whole numbers, got {value!r}")
    return tuple(sorted({kind(v) for v in values}))
