"""Configuration of the activation-sparsity profiler.

One frozen dataclass, validated on construction, with a ``version`` field and a JSON round trip
(:meth:`ProfileConfig.to_dict` / :meth:`ProfileConfig.from_dict`), so the CLI, a recipe file and
Python build the same object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moefy.errors import MoefyError

PROFILE_CONFIG_VERSION = 1

# What makes a neuron "active" for a token; the statistics for each rule live in
# ``moefy.profiling.accumulators.ACTIVE_RULES`` (same keys).
ACTIVE_RULE_NAMES = ("contribution", "nonzero", "magnitude")


@dataclass(frozen=True)
class ProfileConfig:
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
    progress: bool = False
    version: int = PROFILE_CONFIG_VERSION

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: normalise in place once, here
        set_field(self, "shares", _sorted_unique(self.shares, "shares", float))
        set_field(
            self, "rms_thresholds", _sorted_unique(self.rms_thresholds, "rms_thresholds", float)
        )
        set_field(self, "chunk_sizes", _sorted_unique(self.chunk_sizes, "chunk_sizes", int))
        _check_int(self.batch_size, "batch_size", minimum=1)
        _check_int(self.num_hot, "num_hot", minimum=0)
        _check_int(self.version, "version", minimum=1)
        for p in self.shares:
            _check_open_unit(p, "each of shares")
        for t in self.rms_thresholds:
            if not (math.isfinite(t) and t > 0):
                raise MoefyError(f"ProfileConfig.rms_thresholds must be > 0, got {t}")
        for n in self.chunk_sizes:
            _check_int(n, "each of chunk_sizes", minimum=1)
        if self.active_rule not in ACTIVE_RULE_NAMES:
            raise MoefyError(
                f"ProfileConfig.active_rule must be one of {', '.join(ACTIVE_RULE_NAMES)}, "
                f"got {self.active_rule!r}"
            )
        _check_open_unit(self.active_share, "active_share")
        _check_open_unit(self.hot_share, "hot_share")
        if not (isinstance(self.active_threshold, (int, float)) and self.active_threshold >= 0):
            raise MoefyError(
                f"ProfileConfig.active_threshold must be >= 0, got {self.active_threshold!r}"
            )
        for flag in ("coactivation", "progress"):
            if not isinstance(getattr(self, flag), bool):
                raise MoefyError(f"ProfileConfig.{flag} must be true or false")
        if self.version > PROFILE_CONFIG_VERSION:
            raise MoefyError(
                f"ProfileConfig version {self.version} is newer than this moefy understands "
                f"({PROFILE_CONFIG_VERSION}); upgrade moefy"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); :meth:`from_dict` inverts it."""
        return {
            field.name: list(value) if isinstance(value, tuple) else value
            for field in dataclasses.fields(self)
            for value in (getattr(self, field.name),)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error.

        Args:
            data: a mapping of field names to values (lists are accepted for tuple fields).

        Returns:
            The validated config.

        Example:
            >>> ProfileConfig.from_dict({"batch_size": 2, "shares": [0.9]}).shares
            (0.9,)
        """
        if not isinstance(data, Mapping):
            raise MoefyError(f"a ProfileConfig must be a JSON object, got {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoefyError(
                f"unknown ProfileConfig field(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        return cls(**{key: tuple(v) if isinstance(v, list) else v for key, v in data.items()})


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


def _check_int(value: Any, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MoefyError(f"ProfileConfig.{name} must be a whole number >= {minimum}, got {value!r}")


def _check_open_unit(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise MoefyError(f"ProfileConfig.{name} must be between 0 and 1 (exclusive), got {value!r}")
