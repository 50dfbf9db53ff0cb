"""The accounting of :class:`moefy.moe.MoEFFN`: the selection tally, the measured active fraction,
FLOPs per token and the cost protocol of :mod:`moefy.cost`.

Shape legend:
    N: tokens, D: model width, E: experts, S: slots per expert
"""

from __future__ import annotations

import torch

from moefy.cost import ModuleCost, tensor_bytes
from moefy.errors import MoefyError
from moefy.moe.flops import ffn_flops_per_token
from moefy.moe.parts import ExpertParts


class ExpertAccounting(ExpertParts):
    """Accounting part of :class:`moefy.moe.MoEFFN`: what the selections since the last reset cost.

    A mixin: ``selection_counts`` (E,) and ``tokens_seen`` () are non-persistent int64 buffers
    created by ``MoEFFN.__init__``. Shared experts are in every mask the layer runs, so they are
    tallied, and cost FLOPs and weight reads, as the experts they are: run for every token.
    """

    d_ff: int

    def _count(self, mask: torch.Tensor) -> None:
        """Add a (N, E) selection to the tally that FLOPs and active-fraction reports read."""
        with torch.no_grad():
            self.selection_counts += mask.sum(dim=0)
            self.tokens_seen += mask.shape[0]

    def reset_counters(self) -> None:
        """Forget the selections counted so far."""
        self.selection_counts.zero_()
        self.tokens_seen.zero_()

    def reset_tally(self) -> None:
        """Forget the selections counted so far (the former name of :meth:`reset_counters`)."""
        self.reset_counters()

    @property
    def active_fraction(self) -> float:
        """Measured share of experts run per token since the last reset (nan before any)."""
        seen = int(self.tokens_seen)
        if seen == 0:
            return float("nan")
        return int(self.selection_counts.sum()) / (seen * self.num_experts)

    def _in_biases(self) -> int:
        if self.b_in is None:
            return 0
        return 2 if self.gated else 1

    def flops_per_token(self, experts_per_token: float | None = None) -> float:
        """FFN FLOPs per token (see :mod:`moefy.moe.flops`), padding slots included.

        Args:
            experts_per_token: experts run per token; default the measured mean from the tally.

        Returns:
            FLOPs per token, including the selector's own cost.

        Example:
            >>> moe.reset_counters(); moe(x); moe.flops_per_token()
        """
        if experts_per_token is None:
            fraction = self.active_fraction
            if fraction != fraction:  # nan: nothing measured yet
                raise MoefyError("no tokens seen since the last reset_tally(): run a forward first")
            experts_per_token = fraction * self.num_experts
        neurons = experts_per_token * self.expert_size
        flops = ffn_flops_per_token(
            self.d_model,
            neurons,
            gated=self.gated,
            in_biases=self._in_biases(),
            out_bias=self.b_out is not None,
        )
        return flops + self.selector.flops_per_token(self.d_model)

    def dense_flops_per_token(self) -> float:
        """FLOPs per token of the dense FFN this MoE came from (real neurons only)."""
        return ffn_flops_per_token(
            self.d_model,
            self.d_ff,
            gated=self.gated,
            in_biases=self._in_biases(),
            out_bias=self.b_out is not None,
        )

    def measured_cost(self) -> ModuleCost:
        """FLOPs of the selections since the last reset, and the weight bytes a token reads.

        A token reads the selected experts' weights (the measured active fraction of them; all
        of them before any token), the selector's parameters and buffers, and the biases.

        Returns:
            :class:`moefy.cost.ModuleCost` (the cost protocol).
        """
        seen = int(self.tokens_seen)
        flops = self.flops_per_token() * seen if seen else 0.0
        fraction = self.active_fraction if seen else 1.0
        experts = tensor_bytes([self.w_in, self.w_out]) * fraction
        weight_bytes = (
            experts
            + tensor_bytes(self.selector.parameters())
            + tensor_bytes(self.selector.buffers())
            + tensor_bytes(p for p in (self.b_in, self.b_out) if p is not None)
        )
        return ModuleCost(flops=flops, weight_bytes=weight_bytes, tokens=seen)
