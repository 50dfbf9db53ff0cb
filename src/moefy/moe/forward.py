"""The forward paths of :class:`moefy.moe.MoEFFN`: every expert, grouped dispatch, the kernels,
and routed training.

Shape legend:
    N: tokens (all leading dims flattened), D: model width, E: experts, S: slots per expert,
    S_in: input rows per expert (2S gated: gate then up; S)

The module always computes x -> FFN(x) for the whole FFN, whatever the architecture stored
(Conv1D, fused gate/up, inline FFNs): the canonical view is read once, at conversion.

Every path runs the ``num_shared`` shared experts for every token: the selector's masks include
them, and a selection given with :meth:`ExpertForward.select_next` gets them added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn
from torch import nn

from moefy import kernels
from moefy.errors import MoefyError
from moefy.moe.parts import ExpertParts
from moefy.moe.selectors import OracleSelector, selection_mask


@dataclass
class ExpertTrainingRecord:
    """What one MoE layer's training forward leaves for the losses (see
    :meth:`MoEFFN.record_training`).

    Attributes:
        norms: (N, E) true output norm of every expert, differentiable.
        predicted_log_norms: (N, E) the router's prediction, differentiable for the router only
            (its input is detached), or None when the selector learns nothing.
        mask: (N, E) the experts that ran.
    """

    norms: torch.Tensor
    predicted_log_norms: torch.Tensor | None
    mask: torch.Tensor


# Squared-norm floor of the training forward: finite gradients where an expert outputs 0.
_NORM_FLOOR = 1e-12


class ExpertForward(ExpertParts):
    """Compute part of :class:`moefy.moe.MoEFFN`: which path a call takes, and each path.

    A mixin: the weights, the ``selector`` and the tally (:meth:`_count`) come from the class.
    """

    act: nn.Module
    _next_selection: torch.Tensor | None
    _training_records: list[ExpertTrainingRecord] | None
    _straight_through: float | None
    _count: Callable[[torch.Tensor], None]  # the accounting part's tally of selections

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        """(..., S_in) pre-activations -> (..., S) neuron activations h."""
        if not self.gated:
            return self.act(pre)
        gate, up = pre.split(self.expert_size, dim=-1)
        return self.act(gate) * up

    def expert_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of every expert: (N, D) -> (N, E, S)."""
        E = self.num_experts
        w_in = self.w_in.reshape(E * self.w_in.shape[1], self.d_model)
        b_in = None if self.b_in is None else self.b_in.reshape(-1)
        pre = Fn.linear(x, w_in, b_in).unflatten(-1, (E, -1))  # (N, E, S_in)
        return self._activate(pre)

    def expert_norms(self, x: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """True output norm of each expert, ``||W_out_e h_e||``: (N, D) -> (N, E).

        Computed as ``sqrt(h_e^T G_e h_e)`` with the Gram matrices ``G_e = W_out_e W_out_e^T``
        (E, S, S), which costs N*F*S instead of N*F*D multiply-adds when S < D.

        Args:
            x: (N, D) inputs.
            dtype: compute the norms in this dtype (e.g. float32 for training targets of a
                bf16 model); default the weights' dtype. The activations are the model's own.

        Returns:
            (N, E) norms.

        Example:
            >>> moe.expert_norms(x).argmax(dim=-1)  # each token's strongest expert
        """
        return self.expert_norms_from_hidden(self.expert_hidden(x), dtype=dtype)

    def expert_norms_from_hidden(
        self, hidden: torch.Tensor, *, dtype: torch.dtype | None = None, floor: float = 0.0
    ) -> torch.Tensor:
        """``||W_out_e h_e||`` from every expert's activations: (N, E, S) -> (N, E).

        ``dtype`` as for :meth:`expert_norms`. Squared norms below ``floor`` count as
        ``floor``: a positive floor keeps gradients finite where an expert outputs exactly 0
        (ReLU models).
        """
        w_out = self.w_out if dtype is None else self.w_out.to(dtype)  # (E, S, D)
        hidden = hidden if dtype is None else hidden.to(dtype)
        if self.expert_size >= self.d_model:  # Gram matrices would cost more than the products
            norms = [
                (hidden[:, e] @ w_out[e]).square().sum(dim=-1)  # (N,) squared norms
                for e in range(self.num_experts)
            ]
            return torch.stack(norms, dim=-1).clamp_min(floor).sqrt()
        gram = w_out @ w_out.transpose(1, 2)  # (E, S, S)
        projected = torch.einsum("nes,est->net", hidden, gram)  # (N, E, S)
        return (projected * hidden).sum(dim=-1).clamp_min(floor).sqrt()  # (N, E)

    def _forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert for every token, as two dense products: (N, D) -> (N, D)."""
        hidden = self.expert_hidden(x).flatten(1)  # (N, E*S)
        w_out = self.w_out.reshape(-1, self.d_model)  # (E*S, D)
        if self.b_out is None:
            return hidden @ w_out
        return torch.addmm(self.b_out, hidden, w_out)

    def _forward_grouped(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Only the selected experts: gather each expert's tokens, compute, scatter-add.

        Args:
            x: (N, D) tokens.
            mask: (N, E) experts to run per token.

        Returns:
            (N, D) output.
        """
        pairs = mask.t().nonzero()  # (P, 2) (expert, token), grouped by expert
        counts = mask.sum(dim=0).tolist()  # tokens per expert
        outputs = []
        for expert, tokens in enumerate(pairs[:, 1].split(counts)):
            if tokens.numel() == 0:
                continue
            x_e = x.index_select(0, tokens)  # (n_e, D)
            b_in = None if self.b_in is None else self.b_in[expert]
            h_e = self._activate(Fn.linear(x_e, self.w_in[expert], b_in))  # (n_e, S)
            outputs.append(h_e @ self.w_out[expert])  # (n_e, D)
        out = x.new_zeros(x.shape) if self.b_out is None else self.b_out.expand(x.shape).clone()
        if outputs:
            out.index_add_(0, pairs[:, 1], torch.cat(outputs))  # one scatter for all experts
        return out

    def _forward_from_hidden(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Output of the selected experts from all experts' activations.

        Args:
            hidden: (N, E, S) activations of every expert.
            mask: (N, E) experts to keep per token (boolean, or 0 / 1 gates in hidden's dtype
                that may carry a straight-through gradient).

        Returns:
            (N, D): sum over selected e of ``h_e @ W_out_e`` (+ down bias).
        """
        kept = (hidden * mask.unsqueeze(-1).to(hidden.dtype)).flatten(1)  # (N, E*S)
        w_out = self.w_out.reshape(-1, self.d_model)  # (E*S, D)
        if self.b_out is None:
            return kept @ w_out
        return torch.addmm(self.b_out, kept, w_out)

    def select_next(self, selection: torch.Tensor) -> None:
        """Run a given selection at the next forward only, instead of asking the selector.

        The shared experts run too, selected or not: they are the part of the FFN that every
        token uses, and a layer without them would compute a different function.

        Args:
            selection: a boolean mask (..., E) or integer expert ids (..., k) whose leading
                dimensions match the next input's.

        Example:
            >>> moe.select_next(torch.tensor([[0, 3]]))  # token 0 runs experts 0 and 3
        """
        if not isinstance(selection, torch.Tensor):
            raise MoefyError("select_next needs a tensor: a boolean mask or expert ids")
        self._next_selection = selection

    def record_training(
        self,
        records: list[ExpertTrainingRecord] | None,
        *,
        straight_through: float | None = None,
    ) -> None:
        """Train with the selection in the loop: while ``records`` is a list, each forward
        computes every expert, keeps only the selected ones' outputs (so the loss sees what
        inference runs) and appends an :class:`ExpertTrainingRecord` (true norms for an
        efficiency term, the router's prediction for its loss). ``None`` ends it.

        Args:
            records: the list the records go to, or None to end routed training.
            straight_through: a temperature T > 0 to let the model's own loss train a learned
                router: the hard selection stays in the forward, and the backward sees each
                expert's gate as ``sigmoid((score - boundary) / T)`` of the router's predicted
                log norm against the token's selection boundary (straight-through estimator;
                see :func:`straight_through_gates`). None: the router learns only from its fit.
        """
        if straight_through is not None and not straight_through > 0:
            raise MoefyError(f"straight_through must be a temperature > 0, got {straight_through}")
        self._training_records = records
        self._straight_through = None if records is None else straight_through

    def _forward_training(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D) for :meth:`record_training`."""
        hidden = self.expert_hidden(tokens)  # (N, E, S)
        norms = self.expert_norms_from_hidden(hidden, floor=_NORM_FLOOR)  # (N, E)
        selector, predicted, gates = self.selector, None, None
        if selector.selects_all():
            mask = torch.ones(norms.shape, dtype=torch.bool, device=norms.device)
        elif selector.trainable:  # a learned router: fit it, select by what it predicts
            predicted = selector.predict_log_norms(tokens.detach())  # (N, E)
            mask = selector.mask_from_scores(predicted.detach().float().exp())
            if self._straight_through is not None:  # the model's loss reaches the router too
                gates = self._routed_gates(predicted, mask, self._straight_through)
        elif isinstance(selector, OracleSelector):
            mask = selector.mask_from_scores(norms.detach())
        else:
            with torch.no_grad():
                mask = selector(tokens, self)
        self._count(mask)
        self._training_records.append(ExpertTrainingRecord(norms, predicted, mask))
        return self._forward_from_hidden(hidden, mask if gates is None else gates)

    def _routed_gates(
        self, predicted: torch.Tensor, mask: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """(N, E) straight-through gates: the shared experts' are 1 (no selection boundary
        crosses them), the routed experts' as :func:`straight_through_gates`."""
        ns = self.num_shared
        routed = straight_through_gates(predicted[:, ns:], mask[:, ns:], temperature)
        return torch.cat([routed.new_ones(routed.shape[0], ns), routed], dim=1)  # (N, E)

    def _fused_routing(self) -> tuple | None:
        """The selector's :meth:`kernel_route`, or None when the kernel's own top-k would not
        choose what the selector does (shared experts, a load bias)."""
        if self.num_shared or self.selector.load_bias is not None:
            return None
        return self.selector.kernel_route()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D): the FFN output over the selected experts."""
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)  # (N, D)
        if self._training_records is not None:
            return self._forward_training(tokens).reshape(shape)
        if self._next_selection is None and (route := self._fused_routing()) is not None:
            out = self._routed_kernel_call(tokens, *route)
            if out is not None:
                return out.reshape(shape)
        if self._next_selection is not None:
            given, self._next_selection = self._next_selection, None
            mask = selection_mask(given.to(tokens.device), tokens.shape[0], self.num_experts)
            if self.num_shared:  # the shared experts always run
                mask = mask.clone()
                mask[:, : self.num_shared] = True
        elif self.selector.scores_from_expert_hidden and not self.selector.selects_all():
            # The oracle has computed every expert to score them: sum the selected ones' outputs
            # from those activations instead of computing them a second time.
            hidden = self.expert_hidden(tokens)  # (N, E, S)
            mask = self.selector.topk_mask(self.expert_norms_from_hidden(hidden))  # (N, E)
            self._count(mask)
            return self._forward_from_hidden(hidden, mask).reshape(shape)
        else:
            mask = self.selector(tokens, self)  # (N, E)
        self._count(mask)
        return self._forward_selected(tokens, mask).reshape(shape)

    def _kernel_activation(self, tokens: torch.Tensor) -> str | None:
        """The kernels' name of this layer's activation when a kernel takes (N, D) tokens, else
        None (the torch paths run)."""
        if kernels.kernel_fits("expert_ffn", tokens, self.w_in, self.w_out) is None:
            return None
        return kernels.activation_name(self.act)

    def _forward_selected(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, D) tokens, (N, E) selection -> (N, D): a kernel, every expert, or grouped."""
        act = self._kernel_activation(tokens)
        if act is not None:  # decode-sized batch: the C++ (CPU) or Triton (CUDA) kernel reads
            # only the selected experts' weights, once for all tokens (see moefy.kernels)
            return kernels.expert_ffn(tokens, mask, *self._kernel_weights(act))
        # Every expert for every token: the same sums as two dense products, so take those.
        dense = bool(mask.all())
        return self._forward_all(tokens) if dense else self._forward_grouped(tokens, mask)

    def _routed_kernel_call(
        self, tokens: torch.Tensor, k: int, layers: list[tuple[torch.Tensor, torch.Tensor | None]]
    ) -> torch.Tensor | None:
        """(N, D) output of router, top-k and experts in one kernel call (decode-sized batches
        the kernels take), tallied like any selection; None when the torch path should run."""
        act = self._kernel_activation(tokens)
        if act is None:
            return None
        return kernels.routed_expert_ffn(
            tokens, layers, k, self.selection_counts, self.tokens_seen, *self._kernel_weights(act)
        )

    def _kernel_weights(self, act: str) -> tuple:
        """The expert weights, biases, activation name and gating, in the kernels' order."""
        return (self.w_in, self.w_out, self.b_in, self.b_out, act, self.gated)


def straight_through_gates(
    log_scores: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Gates equal to ``mask`` whose gradient is that of a sigmoid around the selection boundary.

    Per token the boundary is halfway between the lowest selected and the highest unselected
    score, so top-k, dynamic k and relative selection all get one; the gradient reaches the
    scores of the experts near it (``sigmoid'((score - boundary) / T) / T``), where a change
    of score changes the selection. A token that selects every expert (or none) has no
    boundary and passes no gradient.

    Args:
        log_scores: (N, E) differentiable router scores (predicted log norms).
        mask: (N, E) boolean selection made from them.
        temperature: T > 0, in units of the scores.

    Returns:
        (N, E) float gates: exactly ``mask`` in value.

    Example:
        >>> gates = straight_through_gates(router_log_norms, mask, temperature=0.5)
    """
    scores = log_scores.float()
    with torch.no_grad():
        low = scores.masked_fill(~mask, float("inf")).amin(dim=-1, keepdim=True)  # (N, 1)
        high = scores.masked_fill(mask, float("-inf")).amax(dim=-1, keepdim=True)  # (N, 1)
        boundary = (low + high) / 2
        has_boundary = torch.isfinite(boundary)
        boundary = torch.where(has_boundary, boundary, torch.zeros_like(boundary))
    soft = torch.sigmoid((scores - boundary) / temperature) * has_boundary  # (N, E)
    return mask.float() + (soft - soft.detach())
