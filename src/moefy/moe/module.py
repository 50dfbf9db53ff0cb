"""The MoE FFN: a dense FFN's neurons regrouped into equal experts, computed per selection.

Shape legend:
    N: tokens (all leading dims flattened), D: model width, F: dense FFN width (d_ff),
    E: experts, S: slots per expert, S_in: input rows per expert (2S gated: gate then up; S)

Weights are expert-major and contiguous (the layout ../shared/PERF.md measured fastest):

    w_in  (E, S_in, D)  expert e's gate rows then up rows, one contiguous block
    w_out (E, S, D)     the down projection transposed, so expert e's slice is contiguous
    b_in  (E, S_in)     input biases (zeros where the dense FFN had none), or absent
    b_out (D,)          the down bias, added once, or absent
    perm  (E, S)        dense neuron index of each slot, -1 for zero-weight padding

The module always computes x -> FFN(x) for the whole FFN, whatever the architecture stored
(Conv1D, fused gate/up, inline FFNs): the canonical view is read once, at conversion.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import nn

from moefy import kernels
from moefy.arch.spec import FFNWeights
from moefy.errors import MoefyError
from moefy.moe.flops import ffn_flops_per_token
from moefy.moe.selectors import ExpertSelector, OracleSelector, selection_mask


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


class MoEFFN(nn.Module):
    """A mixture-of-experts FFN that equals the dense FFN when every expert runs.

    Each forward asks the ``selector`` submodule (default: :class:`OracleSelector` with every
    expert) which experts each token runs, unless a selection was given with
    :meth:`select_next`, then gathers each expert's tokens, computes only those, and scatters
    the outputs back (grouped dispatch). A running tally of selections gives the measured active
    fraction and FLOPs.

    Args:
        d_model: D.
        num_experts: E.
        expert_size: S.
        gated: gated FFN (``act(gate) * up``).
        act: the activation module of the dense FFN.
        in_bias: keep input biases ``b_in``.
        out_bias: keep the down bias ``b_out``.
        selector: the expert selector; default every expert (oracle with no top-k).
        dtype, device: of the weights.

    Example:
        >>> moe = MoEFFN.from_dense(site.weights(), slots)
        >>> moe.selector.set_topk(fraction=0.25)
        >>> y = moe(x)  # (B, T, D)
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        expert_size: int,
        *,
        gated: bool,
        act: nn.Module,
        in_bias: bool = False,
        out_bias: bool = False,
        selector: ExpertSelector | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.d_model, self.num_experts, self.expert_size = d_model, num_experts, expert_size
        self.gated = gated
        rows_in = 2 * expert_size if gated else expert_size
        factory = {"dtype": dtype, "device": device}
        self.w_in = nn.Parameter(torch.zeros(num_experts, rows_in, d_model, **factory))
        self.w_out = nn.Parameter(torch.zeros(num_experts, expert_size, d_model, **factory))
        self.b_in = nn.Parameter(torch.zeros(num_experts, rows_in, **factory)) if in_bias else None
        self.b_out = nn.Parameter(torch.zeros(d_model, **factory)) if out_bias else None
        self.act = act
        self.selector = selector if selector is not None else OracleSelector(num_experts)
        self.register_buffer(
            "perm", torch.full((num_experts, expert_size), -1, dtype=torch.long, device=device)
        )
        # Measurement, not model state: left out of the state dict.
        self.register_buffer(
            "selection_counts",
            torch.zeros(num_experts, dtype=torch.long, device=device),
            persistent=False,
        )
        self.register_buffer(
            "tokens_seen", torch.zeros((), dtype=torch.long, device=device), persistent=False
        )
        self._next_selection: torch.Tensor | None = None
        self._training_records: list[ExpertTrainingRecord] | None = None
        self._straight_through: float | None = None
        # Weightless (meta) copies of the replaced dense modules by slot, kept in a plain dict so
        # they stay outside the module tree and the state dict; unmoefy materialises them.
        self._dense_skeleton: dict[str, nn.Module] = {}
        # Where this FFN sits in its model; set by moefy_ and from_pretrained.
        self.layer_index = -1
        self.site_name = ""
        self.block_name = ""
        self.moefy_config: Any = None  # the MoEfyConfig that made it

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dense(
        cls,
        weights: FFNWeights,
        slots: torch.Tensor,
        *,
        selector: ExpertSelector | None = None,
    ) -> MoEFFN:
        """Regroup a dense FFN's neurons into experts.

        Args:
            weights: the canonical dense weights (views are fine; they are copied).
            slots: (E, S) dense neuron index per expert slot, -1 for padding; every neuron
                exactly once.
            selector: the expert selector (default: all experts).

        Returns:
            A :class:`MoEFFN` with the same dtype and device as ``weights``.
        """
        F, D = weights.d_ff, weights.d_model
        check_slots(slots, F)
        E, S = slots.shape
        device = weights.w_up.device
        slots = slots.to(device)
        valid = slots >= 0  # (E, S)
        index = slots.clamp_min(0)

        def expert_rows(matrix: torch.Tensor) -> torch.Tensor:  # (F, ...) -> (E, S, ...)
            rows = matrix.detach()[index]
            return rows.masked_fill(~valid.view(E, S, *([1] * (rows.ndim - 2))), 0)

        def bias_rows(bias: torch.Tensor | None) -> torch.Tensor:
            return expert_rows(bias if bias is not None else weights.w_up.new_zeros(F))

        has_in_bias = weights.b_up is not None or weights.b_gate is not None
        moe = cls(
            D,
            E,
            S,
            gated=weights.gated,
            act=weights.act,
            in_bias=has_in_bias,
            out_bias=weights.b_down is not None,
            selector=selector,
            dtype=weights.w_up.dtype,
            device=device,
        )
        with torch.no_grad():
            if weights.gated:
                moe.w_in.copy_(
                    torch.cat([expert_rows(weights.w_gate), expert_rows(weights.w_up)], 1)
                )
            else:
                moe.w_in.copy_(expert_rows(weights.w_up))
            moe.w_out.copy_(expert_rows(weights.w_down.t()))
            if moe.b_in is not None:
                parts = [bias_rows(weights.b_gate)] if weights.gated else []
                moe.b_in.copy_(torch.cat([*parts, bias_rows(weights.b_up)], 1))
            if moe.b_out is not None:
                moe.b_out.copy_(weights.b_down.detach())
            moe.perm.copy_(slots)
        trainable = weights.w_up.requires_grad  # a frozen dense FFN gives frozen experts
        for param in (moe.w_in, moe.w_out, moe.b_in, moe.b_out):
            if param is not None:
                param.requires_grad_(trainable)
        return moe

    def keep_dense_skeleton(self, replaced: dict[str, nn.Module]) -> None:
        """Keep weightless copies of the dense modules this MoE replaced, for :func:`unmoefy`.

        Args:
            replaced: the slot -> module dict returned by :func:`moefy.arch.replace_ffn`.
        """
        self._dense_skeleton = {slot: _meta_copy(module) for slot, module in replaced.items()}

    def rebuild_dense_modules(self) -> dict[str, nn.Module]:
        """Fresh modules for the replaced slots: weights uninitialised, on this device and dtype."""
        if not self._dense_skeleton:
            raise MoefyError(
                f"{self.site_name or 'MoEFFN'}: no record of the dense modules it replaced; only "
                "layers made by moefy_ or from_pretrained can be restored"
            )
        # The model may have moved or changed dtype since moefy_: follow the expert weights.
        device, dtype = self.w_in.device, self.w_in.dtype
        return {
            slot: copy.deepcopy(skeleton).to_empty(device=device).to(dtype=dtype)
            for slot, skeleton in self._dense_skeleton.items()
        }

    def dense_weights(self) -> dict[str, torch.Tensor | None]:
        """The dense weights in canonical layout, rebuilt exactly from the expert layout.

        Returns:
            ``w_up`` (F, D), ``w_gate`` (F, D) or None, ``w_down`` (D, F), ``b_up``/``b_gate``
            (F,) or None, ``b_down`` (D,) or None.
        """
        S = self.expert_size
        valid = self.perm >= 0  # (E, S)
        order = self.perm[valid]  # (F,) dense index of each real slot, slot order
        F = order.numel()

        def dense_rows(expert_major: torch.Tensor) -> torch.Tensor:  # (E, S, ...) -> (F, ...)
            out = expert_major.new_empty((F, *expert_major.shape[2:]))
            out[order] = expert_major[valid]
            return out

        w_in = self.w_in.detach()
        b_in = None if self.b_in is None else self.b_in.detach()
        result: dict[str, torch.Tensor | None] = {"w_gate": None, "b_gate": None, "b_up": None}
        if self.gated:
            result["w_gate"], result["w_up"] = dense_rows(w_in[:, :S]), dense_rows(w_in[:, S:])
            if b_in is not None:
                result["b_gate"], result["b_up"] = dense_rows(b_in[:, :S]), dense_rows(b_in[:, S:])
        else:
            result["w_up"] = dense_rows(w_in)
            if b_in is not None:
                result["b_up"] = dense_rows(b_in)
        result["w_down"] = dense_rows(self.w_out.detach()).t()
        result["b_down"] = None if self.b_out is None else self.b_out.detach()
        return result

    # ------------------------------------------------------------------ compute

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

    def select_next(self, selection: torch.Tensor) -> None:
        """Run a given selection at the next forward only, instead of asking the selector.

        Args:
            selection: a boolean mask (..., E) or integer expert ids (..., k) whose leading
                dimensions match the next input's.
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
                gates = straight_through_gates(predicted, mask, self._straight_through)
        elif isinstance(selector, OracleSelector):
            mask = selector.mask_from_scores(norms.detach())
        else:
            with torch.no_grad():
                mask = selector(tokens, self)
        self._count(mask)
        self._training_records.append(ExpertTrainingRecord(norms, predicted, mask))
        return self._forward_from_hidden(hidden, mask if gates is None else gates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D): the FFN output over the selected experts."""
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)  # (N, D)
        if self._training_records is not None:
            return self._forward_training(tokens).reshape(shape)
        if self._next_selection is None and (route := self.selector.kernel_route()) is not None:
            out = self._routed_kernel_call(tokens, *route)
            if out is not None:
                return out.reshape(shape)
        if self._next_selection is not None:
            given, self._next_selection = self._next_selection, None
            mask = selection_mask(given.to(tokens.device), tokens.shape[0], self.num_experts)
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
        act = kernels.expert_ffn_activation(tokens, self.w_in, self.w_out, self.act)
        if act is not None:  # decode-sized batch: the C++ (CPU) or Triton (CUDA) kernel reads
            # only the selected experts' weights, once for all tokens (see moefy.kernels)
            out = kernels.expert_ffn(
                tokens,
                mask,
                self.w_in,
                self.w_out,
                self.b_in,
                self.b_out,
                act,
                self.gated,
            )
            return out.reshape(shape)
        # Every expert for every token: the same sums as two dense products, so take those.
        dense = bool(mask.all())
        out = self._forward_all(tokens) if dense else self._forward_grouped(tokens, mask)
        return out.reshape(shape)

    def _routed_kernel_call(
        self, tokens: torch.Tensor, k: int, layers: list[tuple[torch.Tensor, torch.Tensor | None]]
    ) -> torch.Tensor | None:
        """(N, D) output of router, top-k and experts in one kernel call (decode-sized batches
        the kernels take), tallied like any selection; None when the torch path should run."""
        act = kernels.expert_ffn_activation(tokens, self.w_in, self.w_out, self.act)
        if act is None:
            return None
        return kernels.routed_expert_ffn(
            tokens,
            layers,
            k,
            self.selection_counts,
            self.tokens_seen,
            self.w_in,
            self.w_out,
            self.b_in,
            self.b_out,
            act,
            self.gated,
        )

    def _count(self, mask: torch.Tensor) -> None:
        """Add a (N, E) selection to the tally that FLOPs and active-fraction reports read."""
        with torch.no_grad():
            self.selection_counts += mask.sum(dim=0)
            self.tokens_seen += mask.shape[0]

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

    # ------------------------------------------------------------------ accounting

    @property
    def d_ff(self) -> int:
        """Real (non-padding) neurons, the dense FFN's width."""
        return int((self.perm >= 0).sum())

    def reset_tally(self) -> None:
        """Forget the selections counted so far."""
        self.selection_counts.zero_()
        self.tokens_seen.zero_()

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

    def layer_record(self) -> dict[str, Any]:
        """The structure of this layer, as saved in ``moefy_config.json``."""
        return {
            "index": self.layer_index,
            "name": self.site_name,
            "block": self.block_name,
            "num_experts": self.num_experts,
            "expert_size": self.expert_size,
            "d_ff": self.d_ff,
            "gated": self.gated,
            "in_bias": self.b_in is not None,
            "out_bias": self.b_out is not None,
            "selector": self.selector.to_dict(),
        }

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, experts={self.num_experts}, expert_size={self.expert_size}, "
            f"gated={self.gated}, layer={self.layer_index}"
        )


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


def check_slots(slots: torch.Tensor, d_ff: int) -> None:
    """Check that an (E, S) slot table holds every neuron of ``d_ff`` exactly once.

    Raises:
        MoefyError: otherwise.
    """
    if slots.ndim != 2 or slots.dtype != torch.long:
        raise MoefyError(f"expert slots must be an (E, S) int64 table, got {tuple(slots.shape)}")
    real = slots[slots >= 0]
    if real.numel() != d_ff or not torch.equal(torch.sort(real.cpu()).values, torch.arange(d_ff)):
        raise MoefyError(f"expert slots do not hold each of the {d_ff} neurons exactly once")
    if int(slots.min()) < -1:
        raise MoefyError("expert slots hold indices below -1")


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters live on the meta device (no weight memory)."""
    memo: dict[int, Any] = {
        id(param): nn.Parameter(
            torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
        )
        for param in module.parameters()
    }
    return copy.deepcopy(module, memo)
