"""Sparsity regularisers on FFN activations, and ProSparse's progressive weight schedule.

Shape legend:
    N: tokens, F: FFN width (neurons)

Each penalty takes the activations of every FFN layer (the output of the activation function,
the values a ReLU makes exactly zero) and returns a scalar averaged over layers and tokens:

- ``l1``: mean |a| (ProSparse's L1 term);
- ``hoyer``: per token (sum |a|)^2 / (F * sum a^2), the Hoyer measure of DeepHoyer / D2DMoE
  scaled to [1/F, 1]; it is scale-invariant, so it pushes mass into fewer neurons instead of
  shrinking all of them.

ProSparse raises the L1 weight in stages: within stage ``i`` of ``S`` the weight climbs from
``final * (i - 1) / S`` to ``final * i / S`` along a quarter sine, so each increase starts gently
and the model adapts before the next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moefy.errors import MoefyError

REGULARIZERS = ("none", "l1", "hoyer", "prosparse")
_EPS = 1e-12


def l1_penalty(activations: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean |a| over layers (each (..., F), mean over all its entries)."""
    if not activations:
        raise MoefyError("no FFN activations were captured: run a forward pass first")
    return torch.stack([a.abs().float().mean() for a in activations]).mean()


def hoyer_penalty(activations: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of (sum_i |a_i|)^2 / (F * sum_i a_i^2)."""
    if not activations:
        raise MoefyError("no FFN activations were captured: run a forward pass first")
    per_layer = []
    for a in activations:
        a = a.float().reshape(-1, a.shape[-1])  # (N, F)
        l1 = a.abs().sum(-1)
        l2sq = (a * a).sum(-1)
        per_layer.append((l1 * l1 / (a.shape[-1] * l2sq + _EPS)).mean())
    return torch.stack(per_layer).mean()


def penalty(name: str, activations: Sequence[torch.Tensor]) -> torch.Tensor:
    """The regulariser ``name`` (``l1`` and ``prosparse`` are both L1) of ``activations``."""
    if name in ("l1", "prosparse"):
        return l1_penalty(activations)
    if name == "hoyer":
        return hoyer_penalty(activations)
    raise MoefyError(f"no penalty for regulariser {name!r}; known: {', '.join(REGULARIZERS)}")


def prosparse_weight(progress: float, final: float, stages: int) -> float:
    """ProSparse's regularisation weight at ``progress`` in [0, 1] of the run.

    Args:
        progress: share of the budget (steps, tokens or time) used so far.
        final: the weight reached at the end.
        stages: number of stages.

    Example:
        >>> prosparse_weight(0.25, 1.0, 2)  # halfway through stage 1: sin(pi/4) of its step
        0.35355...
    """
    if stages < 1:
        raise MoefyError(f"ProSparse needs >= 1 stage, got {stages}")
    progress = min(max(progress, 0.0), 1.0)
    stage = min(int(progress * stages), stages - 1)  # 0-based
    within = progress * stages - stage  # [0, 1]
    start = final * stage / stages
    return start + (final / stages) * math.sin(0.5 * math.pi * within)


def weight_at(name: str, progress: float, final: float, stages: int) -> float:
    """The regularisation weight of regulariser ``name`` at ``progress`` of the run."""
    if name == "none":
        return 0.0
    if name == "prosparse":
        return prosparse_weight(progress, final, stages)
    return final
