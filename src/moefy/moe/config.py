"""The MoEfication config and the expert layout it implies for one FFN.

Shape legend:
    F: FFN width (d_ff), E: number of experts, S: slots per expert (expert size)

When ``d_ff`` is not a multiple of the expert size, the experts are padded with zero-weight
neurons: every expert has the same number of slots ``S`` (a multiple of ``size_multiple``, so
kernels see friendly sizes), the real neurons are spread as evenly as possible (expert sizes in
real neurons differ by at most one) and the remaining slots hold neurons whose input and output
weights are zero. A zero-weight neuron adds exactly zero to the output, so the MoE stays exact.
Padding costs compute, so a layout that pads more than ``max_padding_fraction`` of ``d_ff`` is
refused with a message that suggests sizes which divide ``d_ff``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from moefy.errors import MoefyError
from moefy.jsonconfig import loads_json

CONFIG_VERSION = 1
_SUGGESTIONS = 4
# Suggested expert counts are those nearest (in log scale) to this common choice.
_TYPICAL_EXPERTS = 64


@dataclass(frozen=True)
class MoEfyConfig:
    """How to split each dense FFN into equal-size experts.

    Give exactly one of ``num_experts`` and ``expert_size``.

    Attributes:
        num_experts: experts per FFN layer (E).
        expert_size: neurons per expert (S); then E = ceil(d_ff / S).
        method: split method, a key of :data:`moefy.moe.split.SPLIT_METHODS`: ``"random"``
            (seeded permutation), ``"params"`` (balanced k-means on the normalised input-weight
            rows) or ``"coactivation"`` (balanced partition of the co-activation graph of a
            :class:`SparsityProfile`).
        seed: seed of every random choice; layer ``i`` uses ``seed + i``.
        size_multiple: the expert size is rounded up to a multiple of this (8 or 16 suit
            kernels); rounding pads experts with zero-weight neurons.
        max_padding_fraction: refuse layouts whose zero-weight padding exceeds this fraction of
            d_ff (padding is computed like real neurons).
        version: config format version.

    Example:
        >>> cfg = MoEfyConfig(num_experts=64, method="params")
        >>> MoEfyConfig.from_json(cfg.to_json()) == cfg
        True
    """

    num_experts: int | None = None
    expert_size: int | None = None
    method: str = "params"
    seed: int = 0
    size_multiple: int = 1
    max_padding_fraction: float = 0.125
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        from moefy.moe.split import SPLIT_METHODS

        if (self.num_experts is None) == (self.expert_size is None):
            raise MoefyError("MoEfyConfig: give exactly one of num_experts and expert_size")
        for name in ("num_experts", "expert_size"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise MoefyError(f"MoEfyConfig.{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.size_multiple) or self.size_multiple < 1:
            raise MoefyError(
                f"MoEfyConfig.size_multiple must be an integer >= 1, got {self.size_multiple!r}"
            )
        if self.expert_size is not None and self.expert_size % self.size_multiple:
            raise MoefyError(
                f"MoEfyConfig.expert_size={self.expert_size} is not a multiple of "
                f"size_multiple={self.size_multiple}"
            )
        if not _is_int(self.seed):
            raise MoefyError(f"MoEfyConfig.seed must be an integer, got {self.seed!r}")
        if not 0.0 <= float(self.max_padding_fraction) < 1.0:
            raise MoefyError(
                "MoEfyConfig.max_padding_fraction must be in [0, 1), got "
                f"{self.max_padding_fraction!r}"
            )
        if self.method not in SPLIT_METHODS:
            known = ", ".join(sorted(SPLIT_METHODS))
            raise MoefyError(
                f"MoEfyConfig.method={self.method!r} is unknown (known: {known}); add one with "
                "moefy.moe.register_split_method"
            )
        if self.version != CONFIG_VERSION:
            raise MoefyError(
                f"MoEfyConfig version {self.version!r} is not supported (this moefy reads "
                f"version {CONFIG_VERSION})"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEfyConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(data, dict):
            raise MoefyError(f"MoEfyConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoefyError(f"MoEfyConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MoEfyConfig:
        """Rebuild a config from :meth:`to_json` output."""
        try:
            data = loads_json(text)
        except json.JSONDecodeError as err:
            raise MoefyError(f"MoEfyConfig: not valid JSON ({err})") from None
        return cls.from_dict(data)

    def layout(self, d_ff: int) -> ExpertLayout:
        """The expert layout of an FFN of width ``d_ff`` under this config.

        Args:
            d_ff: FFN width F of the layer.

        Returns:
            The :class:`ExpertLayout` (E, S and real neurons per expert).

        Raises:
            MoefyError: more experts than neurons, or more padding than allowed; the message
                suggests sizes that divide ``d_ff``.

        Example:
            >>> MoEfyConfig(num_experts=128).layout(11008).expert_size
            86
        """
        if self.num_experts is not None:
            num_experts = self.num_experts
            if num_experts > d_ff:
                raise MoefyError(
                    f"num_experts={num_experts} exceeds d_ff={d_ff}: every expert needs at least "
                    f"one neuron; try {_suggest(d_ff, self.size_multiple)}"
                )
            expert_size = _round_up(math.ceil(d_ff / num_experts), self.size_multiple)
        else:
            expert_size = int(self.expert_size)
            if expert_size > d_ff:
                raise MoefyError(
                    f"expert_size={expert_size} exceeds d_ff={d_ff}; "
                    f"try {_suggest(d_ff, self.size_multiple)}"
                )
            num_experts = math.ceil(d_ff / expert_size)
        padding = num_experts * expert_size - d_ff
        if padding > self.max_padding_fraction * d_ff:
            raise MoefyError(
                f"{num_experts} experts of {expert_size} slots pad d_ff={d_ff} with {padding} "
                f"zero neurons ({padding / d_ff:.1%} > max_padding_fraction="
                f"{self.max_padding_fraction}); sizes that divide it: "
                f"{_suggest(d_ff, self.size_multiple)}"
            )
        base, extra = divmod(d_ff, num_experts)
        sizes = tuple(base + 1 if e < extra else base for e in range(num_experts))
        return ExpertLayout(num_experts=num_experts, expert_size=expert_size, real_sizes=sizes)


@dataclass(frozen=True)
class ExpertLayout:
    """Experts of one FFN layer.

    Attributes:
        num_experts: E.
        expert_size: S, slots per expert (real neurons plus zero padding).
        real_sizes: real neurons in each expert (E values, differing by at most one, summing to
            d_ff); expert e has ``expert_size - real_sizes[e]`` padding slots at its end.
    """

    num_experts: int
    expert_size: int
    real_sizes: tuple[int, ...]

    @property
    def d_ff(self) -> int:
        return sum(self.real_sizes)

    @property
    def padding(self) -> int:
        return self.num_experts * self.expert_size - self.d_ff


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _suggest(d_ff: int, size_multiple: int) -> str:
    """A few (experts x size) pairs that tile ``d_ff`` exactly with sizes of the multiple."""
    pairs = [
        (d_ff // size, size)
        for size in range(size_multiple, d_ff + 1, size_multiple)
        if d_ff % size == 0 and d_ff // size > 1
    ]
    if not pairs:
        return f"an expert_size that is a multiple of {size_multiple} and divides {d_ff}"
    pairs.sort(key=lambda p: abs(math.log2(p[0] / _TYPICAL_EXPERTS)))
    shown = sorted(pairs[:_SUGGESTIONS], reverse=True)
    return ", ".join(f"num_experts={e} (expert_size={s})" for e, s in shown)
