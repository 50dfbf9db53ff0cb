"""The activations the C++ kernels compute, and which of them an ``nn.Module`` computes.

A module is matched by what it computes, not by its class name: it is run once on a probe tensor
and compared with each known formula, so a renamed or wrapped activation still finds its kernel
and an unknown one falls back to torch. The answer is remembered per module.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as Fn
from torch import nn

# name -> code the C++ kernel uses (see csrc/sparse_ffn.cpp, enum Activation)
ACTIVATIONS = {"relu": 0, "silu": 1, "gelu_tanh": 2, "gelu_erf": 3}
# The probe covers negative, small and large inputs, where the formulas differ.
PROBE_LIMIT = 6.0
PROBE_POINTS = 97
PROBE_TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}
# The probe's answer is kept on the module itself (a plain attribute, outside the state dict):
# a compiled step reads it like any attribute, and it lives exactly as long as the module.
_KIND_ATTRIBUTE = "_moefy_kernel_activation"
_UNPROBED = object()


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """``name``'s activation of ``x`` (any shape) in plain torch."""
    if name == "relu":
        return Fn.relu(x)
    if name == "silu":
        return Fn.silu(x)
    if name == "gelu_tanh":
        return Fn.gelu(x, approximate="tanh")
    if name == "gelu_erf":
        return Fn.gelu(x)
    raise ValueError(f"unknown kernel activation {name!r} (known: {sorted(ACTIVATIONS)})")


def activation_name(act: nn.Module) -> str | None:
    """The name in :data:`ACTIVATIONS` of what ``act`` computes, or None when it is none of them.

    Example:
        >>> activation_name(nn.GELU(approximate="tanh"))
        'gelu_tanh'
    """
    known = getattr(act, _KIND_ATTRIBUTE, _UNPROBED)
    if known is not _UNPROBED:
        return known  # type: ignore[return-value]
    probe = torch.linspace(-PROBE_LIMIT, PROBE_LIMIT, PROBE_POINTS, dtype=torch.float32)
    probe = torch.cat([probe, probe.new_tensor([0.0, 1e-3, -1e-3, math.pi])])
    try:
        with torch.no_grad():
            seen = act(probe)
    except (RuntimeError, TypeError, ValueError):
        seen = None
    found = None
    if isinstance(seen, torch.Tensor) and seen.shape == probe.shape:
        for name in ACTIVATIONS:
            if torch.allclose(seen.float(), apply_activation(probe, name), **PROBE_TOLERANCE):
                found = name
                break
    with contextlib.suppress(AttributeError, TypeError):  # no attributes: probe next time
        setattr(act, _KIND_ATTRIBUTE, found)
    return found
