"""Weights in the layout the threshold kernel reads: (I, O), one contiguous row per input.

An ``nn.Linear`` stores (O, I), so a dropped input would skip a strided column; the kernel needs
the transpose. A GPT-2 ``Conv1D`` already stores (I, O) and is used as it is. The transpose of a
Linear weight is derived data, not model state: it is made once, kept outside the module tree
(so the state dict and saved files are unchanged), and remade when the weight changes (another
tensor, device, dtype, or an in-place edit).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

_transposed: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _weight_key(weight: torch.Tensor) -> tuple:
    return (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))


def transposed_weight(layer: nn.Module) -> torch.Tensor:
    """(I, O) contiguous weight of a Linear (a cached transpose) or a Conv1D (its own weight).

    Example:
        >>> transposed_weight(nn.Linear(8, 4)).shape
        torch.Size([8, 4])
    """
    weight = layer.weight.detach()
    if not isinstance(layer, nn.Linear):  # Conv1D: (I, O) already
        return weight if weight.is_contiguous() else _cached(layer, weight, weight)
    return _cached(layer, weight, weight.t())


def _cached(layer: nn.Module, weight: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    key = _weight_key(weight)
    hit = _transposed.get(layer)
    if hit is not None and hit[0] == key:
        return hit[1]
    copy = view.contiguous()
    _transposed[layer] = (key, copy)
    return copy


# id(tensor) -> (weak reference, version key, answer). Not a WeakKeyDictionary: its lookups
# compare tensors with ``==``, which is elementwise and raises for a tensor of several entries.
_all_zero: dict[int, tuple[weakref.ref, tuple, bool]] = {}


def is_all_zero(tensor: torch.Tensor) -> bool:
    """Whether every entry of ``tensor`` is zero; remembered until the tensor changes.

    A calibrated threshold buffer changes rarely but is asked about on every decode step.
    """
    key = _weight_key(tensor)
    hit = _all_zero.get(id(tensor))
    if hit is not None and hit[0]() is tensor and hit[1] == key:
        return hit[2]
    answer = not bool(tensor.any())
    ident = id(tensor)
    forget = weakref.ref(tensor, lambda _ref: _all_zero.pop(ident, None))
    _all_zero[ident] = (forget, key, answer)
    return answer
