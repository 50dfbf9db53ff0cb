"""Expert layouts: how many experts of how many slots tile one FFN layer.

:class:`ExpertLayout` is what :meth:`moefy.moe.MoEfyConfig.layout` returns and what the split
methods of :mod:`moefy.moe.split` fill; it lives apart from both so neither imports the other.

The first ``num_shared`` experts of a layout are shared (always run); the split methods fill
only the others, the routed experts (:meth:`ExpertLayout.routed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moefy.errors import MoefyError

_SUGGESTIONS = 4
# Suggested expert counts are those nearest (in log scale) to this common choice.
_TYPICAL_EXPERTS = 64


@dataclass(frozen=True)
class ExpertLayout:
    """Experts of one FFN layer.

    Attributes:
        num_experts: E.
        expert_size: S, slots per expert (real neurons plus zero padding).
        real_sizes: real neurons in each expert (E values, differing by at most one, summing to
            d_ff); expert e has ``expert_size - real_sizes[e]`` padding slots at its end.
        num_shared: the first ``num_shared`` experts are shared (run for every token), in
            ``[0, num_experts)``: at least one expert is routed.

    Example:
        >>> layout = ExpertLayout(4, expert_size=2, real_sizes=(2, 2, 2, 2), num_shared=1)
        >>> layout.routed().num_experts
        3
    """

    num_experts: int
    expert_size: int
    real_sizes: tuple[int, ...]
    num_shared: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.num_shared < self.num_experts:
            raise MoefyError(
                f"{self.num_shared} shared experts of {self.num_experts} leave no routed expert: "
                "at least one expert must be routed"
            )

    @property
    def d_ff(self) -> int:
        return sum(self.real_sizes)

    @property
    def padding(self) -> int:
        return self.num_experts * self.expert_size - self.d_ff

    @property
    def shared_neurons(self) -> int:
        """Real neurons in the shared experts."""
        return sum(self.real_sizes[: self.num_shared])

    def with_shared(self, num_shared: int) -> ExpertLayout:
        """The same experts with ``num_shared`` of them shared."""
        return ExpertLayout(self.num_experts, self.expert_size, self.real_sizes, num_shared)

    def routed(self) -> ExpertLayout:
        """The layout of the routed experts alone (what a split method fills)."""
        return ExpertLayout(
            self.num_experts - self.num_shared, self.expert_size, self.real_sizes[self.num_shared :]
        )


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


def suggest_sizes(d_ff: int, size_multiple: int) -> str:
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
