"""The parts every mixin of :class:`moefy.moe.MoEFFN` reads, declared once.

``MoEFFN.__init__`` creates them; the mixins (:class:`~moefy.moe.weights.ExpertWeights`,
:class:`~moefy.moe.forward.ExpertForward`, :class:`~moefy.moe.accounting.ExpertAccounting`)
subclass :class:`ExpertParts` so each names only what is its own.

Shapes: E experts of S slots over a model width D.
"""

from __future__ import annotations

import torch
from torch import nn

from moefy.moe.selectors import ExpertSelector


class ExpertParts:
    """Declarations (no behaviour) of the parameters and buffers of one MoE layer.

    Attributes:
        d_model: D.
        num_experts: E.
        expert_size: S.
        num_shared: the first ``num_shared`` experts run for every token (shared experts).
        gated: whether ``w_in`` holds a gate beside the up projection.
        w_in: the (E, S, D) up projection ((E, 2S, D) with the gate).
        w_out: the (E, S, D) down projection.
        b_in: the (E, S) up bias ((E, 2S) with the gate), or None.
        b_out: the (D,) down bias, or None.
        selector: which experts each token uses.
        selection_counts: (E,) int64 tally of selections since the last reset.
        tokens_seen: () int64 tally of tokens since the last reset.

    Example:
        >>> class ExpertNorms(ExpertParts):
        ...     def norms(self): return self.w_out.norm(dim=(1, 2))
    """

    d_model: int
    num_experts: int
    expert_size: int
    num_shared: int
    gated: bool
    w_in: nn.Parameter
    w_out: nn.Parameter
    b_in: nn.Parameter | None
    b_out: nn.Parameter | None
    selector: ExpertSelector
    selection_counts: torch.Tensor
    tokens_seen: torch.Tensor
