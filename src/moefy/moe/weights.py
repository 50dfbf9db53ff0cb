"""The expert-major weights of :class:`moefy.moe.MoEFFN`: built from a dense FFN, read back
exactly, and the record of the dense modules they replaced.

Shape legend:
    F: dense FFN width (d_ff), D: model width, E: experts, S: slots per expert,
    S_in: input rows per expert (2S gated: gate then up; S)

Weights are expert-major and contiguous (the layout measured fastest for gathering experts):

    w_in  (E, S_in, D)  expert e's gate rows then up rows, one contiguous block
    w_out (E, S, D)     the down projection transposed, so expert e's slice is contiguous
    b_in  (E, S_in)     input biases (zeros where the dense FFN had none), or absent
    b_out (D,)          the down bias, added once, or absent
    perm  (E, S)        dense neuron index of each slot, -1 for zero-weight padding
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moefy.arch.spec import FFNWeights
from moefy.errors import MoefyError
from moefy.moe.parts import ExpertParts

if TYPE_CHECKING:
    from moefy.moe.selectors import ExpertSelector


class ExpertWeights(ExpertParts):
    """Layout part of :class:`moefy.moe.MoEFFN`: conversion from and back to the dense FFN.

    A mixin: the parameters and buffers it reads are created by ``MoEFFN.__init__``.
    """

    perm: torch.Tensor
    site_name: str
    _dense_skeleton: dict[str, nn.Module]

    @classmethod
    def from_dense(
        cls,
        weights: FFNWeights,
        slots: torch.Tensor,
        *,
        selector: ExpertSelector | None = None,
        num_shared: int = 0,
    ) -> Any:
        """Regroup a dense FFN's neurons into experts.

        Args:
            weights: the canonical dense weights (views are fine; they are copied).
            slots: (E, S) dense neuron index per expert slot, -1 for padding; every neuron
                exactly once.
            selector: the expert selector (default: all experts).
            num_shared: the first ``num_shared`` experts are shared (always run).

        Returns:
            A :class:`MoEFFN` with the same dtype and device as ``weights``.

        Example:
            >>> moe = MoEFFN.from_dense(site.weights(), slots)
        """
        check_slots(slots, weights.d_ff)
        E, S = slots.shape
        device = weights.w_up.device
        moe = cls(
            weights.d_model,
            E,
            S,
            gated=weights.gated,
            act=weights.act,
            in_bias=weights.b_up is not None or weights.b_gate is not None,
            out_bias=weights.b_down is not None,
            selector=selector,
            num_shared=num_shared,
            dtype=weights.w_up.dtype,
            device=device,
        )
        moe._copy_dense(weights, slots.to(device))
        trainable = weights.w_up.requires_grad  # a frozen dense FFN gives frozen experts
        for param in (moe.w_in, moe.w_out, moe.b_in, moe.b_out):
            if param is not None:
                param.requires_grad_(trainable)
        return moe

    def _copy_dense(self, weights: FFNWeights, slots: torch.Tensor) -> None:
        """Fill the expert-major weights from the dense ones by the (E, S) slot table."""
        E, S = slots.shape
        valid = slots >= 0  # (E, S)
        index = slots.clamp_min(0)

        def expert_rows(matrix: torch.Tensor) -> torch.Tensor:  # (F, ...) -> (E, S, ...)
            rows = matrix.detach()[index]
            return rows.masked_fill(~valid.view(E, S, *([1] * (rows.ndim - 2))), 0)

        def bias_rows(bias: torch.Tensor | None) -> torch.Tensor:
            return expert_rows(bias if bias is not None else weights.w_up.new_zeros(weights.d_ff))

        with torch.no_grad():
            if weights.gated:
                self.w_in.copy_(
                    torch.cat([expert_rows(weights.w_gate), expert_rows(weights.w_up)], 1)
                )
            else:
                self.w_in.copy_(expert_rows(weights.w_up))
            self.w_out.copy_(expert_rows(weights.w_down.t()))
            if self.b_in is not None:
                parts = [bias_rows(weights.b_gate)] if weights.gated else []
                self.b_in.copy_(torch.cat([*parts, bias_rows(weights.b_up)], 1))
            if self.b_out is not None:
                self.b_out.copy_(weights.b_down.detach())
            self.perm.copy_(slots)

    @property
    def d_ff(self) -> int:
        """Real (non-padding) neurons, the dense FFN's width."""
        return int((self.perm >= 0).sum())

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
