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

Shared experts: ``shared`` is the share of each layer's E experts that run for every token
(``round(shared * E)`` of them, the first ones of the layout); at least one expert stays routed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from moefy.errors import MoefyError
from moefy.jsonconfig import JsonConfig
from moefy.moe.layout import ExpertLayout, round_up, suggest_sizes
from moefy.validate import check_choice, check_fraction, check_int

__all__ = ["CONFIG_VERSION", "SHARED_RULES", "ExpertLayout", "MoEfyConfig"]

CONFIG_VERSION = 1
# How each layer's number of shared experts is chosen: "fixed" (round(shared * E) in every
# layer) or "profile" (per layer, from the neurons' activation rates; see moefy.moe.convert).
SHARED_RULES = ("fixed", "profile")


@dataclass(frozen=True)
class MoEfyConfig(JsonConfig):
    """How to split each dense FFN into equal-size experts.

    Give exactly one of ``num_experts`` and ``expert_size``.

    Attributes:
        num_experts: experts per FFN layer (E).
        expert_size: neurons per expert (S); then E = ceil(d_ff / S).
        method: split method, a name in :data:`moefy.moe.split.SPLIT_METHODS`: ``"random"``
            (seeded permutation), ``"params"`` (balanced k-means on the normalised input-weight
            rows) or ``"coactivation"`` (balanced partition of the co-activation graph of a
            :class:`SparsityProfile`).
        seed: seed of every random choice; layer ``i`` uses ``seed + i``.
        size_multiple: the expert size is rounded up to a multiple of this (8 or 16 suit
            kernels); rounding pads experts with zero-weight neurons.
        max_padding_fraction: refuse layouts whose zero-weight padding exceeds this fraction of
            d_ff (padding is computed like real neurons).
        shared: share of each layer's experts that are shared (run for every token), in
            [0, 1): ``round(shared * E)`` experts hold the neurons with the highest activation
            rates of a profile (needs ``profile=``); 0 = none.
        shared_rule: ``"fixed"`` (``round(shared * E)`` shared experts in every layer) or
            ``"profile"`` (per layer, the neurons at least twice as often top as the average
            one, in whole experts, at most ``round(shared * E)``, or half the experts when
            ``shared`` is 0).
        version: config format version.

    Example:
        >>> cfg = MoEfyConfig(num_experts=64, method="params")
        >>> MoEfyConfig.from_json(cfg.to_json()) == cfg
        True
        >>> MoEfyConfig(num_experts=64, shared=0.125).layout(1536).num_shared
        8
    """

    num_experts: int | None = None
    expert_size: int | None = None
    method: str = "params"
    seed: int = 0
    size_multiple: int = 1
    max_padding_fraction: float = 0.125
    shared: float = 0.0
    shared_rule: str = "fixed"
    version: int = CONFIG_VERSION

    VERSION: ClassVar[int] = CONFIG_VERSION

    def __post_init__(self) -> None:
        if (self.num_experts is None) == (self.expert_size is None):
            raise MoefyError("MoEfyConfig: give exactly one of num_experts and expert_size")
        for name in ("num_experts", "expert_size"):
            if getattr(self, name) is not None:
                check_int(f"MoEfyConfig.{name}", getattr(self, name), minimum=1)
        check_int("MoEfyConfig.size_multiple", self.size_multiple, minimum=1)
        if self.expert_size is not None and self.expert_size % self.size_multiple:
            raise MoefyError(
                f"MoEfyConfig.expert_size={self.expert_size} is not a multiple of "
                f"size_multiple={self.size_multiple}"
            )
        check_int("MoEfyConfig.seed", self.seed)
        check_fraction("MoEfyConfig.max_padding_fraction", self.max_padding_fraction)
        check_fraction("MoEfyConfig.shared", self.shared)
        check_choice("MoEfyConfig.shared_rule", self.shared_rule, SHARED_RULES)
        _check_method(self.method)
        self.check_version()

    def layout(self, d_ff: int) -> ExpertLayout:
        """The expert layout of an FFN of width ``d_ff`` under this config.

        Args:
            d_ff: FFN width F of the layer.

        Returns:
            The :class:`ExpertLayout` (E, S, real neurons per expert and ``round(shared * E)``
            shared experts).

        Raises:
            MoefyError: more experts than neurons, or more padding than allowed (the message
                suggests sizes that divide ``d_ff``), or a ``shared`` share that leaves no
                routed expert.

        Example:
            >>> MoEfyConfig(num_experts=128).layout(11008).expert_size
            86
        """
        if self.num_experts is not None:
            num_experts = self.num_experts
            if num_experts > d_ff:
                raise MoefyError(
                    f"num_experts={num_experts} exceeds d_ff={d_ff}: every expert needs at least "
                    f"one neuron; try {suggest_sizes(d_ff, self.size_multiple)}"
                )
            expert_size = round_up(math.ceil(d_ff / num_experts), self.size_multiple)
        else:
            expert_size = int(self.expert_size)
            if expert_size > d_ff:
                raise MoefyError(
                    f"expert_size={expert_size} exceeds d_ff={d_ff}; "
                    f"try {suggest_sizes(d_ff, self.size_multiple)}"
                )
            num_experts = math.ceil(d_ff / expert_size)
        padding = num_experts * expert_size - d_ff
        if padding > self.max_padding_fraction * d_ff:
            raise MoefyError(
                f"{num_experts} experts of {expert_size} slots pad d_ff={d_ff} with {padding} "
                f"zero neurons ({padding / d_ff:.1%} > max_padding_fraction="
                f"{self.max_padding_fraction}); sizes that divide it: "
                f"{suggest_sizes(d_ff, self.size_multiple)}"
            )
        base, extra = divmod(d_ff, num_experts)
        sizes = tuple(base + 1 if e < extra else base for e in range(num_experts))
        num_shared = self.num_shared(num_experts)
        if num_shared >= num_experts:
            raise MoefyError(
                f"shared={self.shared} of {num_experts} experts makes {num_shared} shared experts "
                f"and leaves no routed expert: use shared < {(num_experts - 0.5) / num_experts:.4g}"
                " or more experts"
            )
        return ExpertLayout(num_experts, expert_size, sizes, num_shared)

    def num_shared(self, num_experts: int) -> int:
        """Shared experts of a layer of ``num_experts`` under the ``fixed`` rule, and the most
        the ``profile`` rule gives: ``round(shared * E)`` (halves round up)."""
        return math.floor(self.shared * num_experts + 0.5)


def _check_method(method: str) -> None:
    """``method`` names a registered split method (looked up when a config is built, so split
    methods registered after this module was imported count)."""
    from moefy.moe.split import SPLIT_METHODS

    if method not in SPLIT_METHODS:
        known = ", ".join(sorted(SPLIT_METHODS))
        raise MoefyError(
            f"MoEfyConfig.method={method!r} is unknown (known: {known}); add one with "
            "moefy.moe.register_split_method"
        )
