"""The cost protocol: every module moefy swaps into a model reports what it spent and resets its
own counters, so evaluation, the sweep and the benchmarks ask the modules instead of testing types.

A swapped module (a :class:`moefy.moe.MoEFFN`, a sparse wrapper of :mod:`moefy.sparsify`, a
dropped layer of :mod:`moefy.layers`, or a new kind) implements two methods:

    measured_cost() -> ModuleCost   what it spent since its counters were last reset
    reset_counters() -> None        forget it

and nothing else: :func:`moefy.eval.measure_cost` and :func:`moefy.bench.weight_bytes_per_token`
find such modules with :func:`swapped_modules`, take their figures and leave their subtrees alone.

Counting convention (shared by every report): a multiply-add is :data:`FLOPS_PER_MULTIPLY_ADD`
FLOPs; a batch-1 step reads each weight it multiplies once.

Example:
    >>> reset_counters(model)
    >>> model(input_ids)
    >>> sum(module.measured_cost().flops for _, module in swapped_modules(model))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

FLOPS_PER_MULTIPLY_ADD = 2


@dataclass(frozen=True)
class ModuleCost:
    """What one swapped module spent since its counters were last reset.

    Attributes:
        flops: FLOPs spent in total over ``tokens`` (the module and everything it holds).
        weight_bytes: weight bytes one token reads at batch 1, at the shares measured over
            ``tokens`` (the module's full weights when it has counted nothing yet).
        tokens: rows (tokens) the module ran; 0 for a module that computes nothing.

    Example:
        >>> ModuleCost(flops=96.0, weight_bytes=128.0, tokens=3).flops_per_token
        32.0
    """

    flops: float
    weight_bytes: float
    tokens: int

    @property
    def flops_per_token(self) -> float:
        """``flops / tokens``; 0 when no token was counted."""
        return self.flops / self.tokens if self.tokens else 0.0


NOTHING = ModuleCost(flops=0.0, weight_bytes=0.0, tokens=0)


@runtime_checkable
class MeasuredModule(Protocol):
    """What a module moefy swaps in implements (structural: no base class needed)."""

    def measured_cost(self) -> ModuleCost:
        """FLOPs and weight bytes since the last :meth:`reset_counters`."""
        ...

    def reset_counters(self) -> None:
        """Forget what was counted."""
        ...


def swapped_modules(model: nn.Module) -> Iterator[tuple[str, MeasuredModule]]:
    """(dotted path, module) of every outermost module of ``model`` that reports its own cost.

    A reporting module answers for its whole subtree (a MoE's selector, a wrapper's base layer),
    so modules inside one are not listed.

    Args:
        model: any model, changed by moefy or not.

    Yields:
        ``(path, module)`` in module order.
    """
    if isinstance(model, MeasuredModule):  # the model is itself one swapped module
        yield "", model
        return
    roots: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(root + ".") for root in roots):
            continue
        if isinstance(module, MeasuredModule):
            roots.append(path)
            yield path, module


def reset_counters(model: nn.Module) -> None:
    """Forget what every swapped module of ``model`` counted (MoE tallies, skip counters, ...).

    Example:
        >>> reset_counters(model); model(input_ids)
    """
    for _, module in swapped_modules(model):
        module.reset_counters()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> float:
    """Bytes the given tensors hold, as a float (the unit of ``ModuleCost.weight_bytes``)."""
    return float(sum(t.numel() * t.element_size() for t in tensors))
