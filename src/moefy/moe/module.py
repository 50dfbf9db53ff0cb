"""The MoE FFN: a dense FFN's neurons regrouped into equal experts, computed per selection.

Shape legend:
    N: tokens (all leading dims flattened), D: model width, F: dense FFN width (d_ff),
    E: experts, S: slots per expert, S_in: input rows per expert (2S gated: gate then up; S)

:class:`MoEFFN` is composed of three parts, one module each:

    moefy.moe.weights     the expert-major weights: from_dense, dense_weights, the skeleton
    moefy.moe.forward     the forward paths: every expert, grouped, kernels, routed training
    moefy.moe.accounting  the selection tally: active fraction, FLOPs, the cost protocol

This module holds the parameters and buffers (the state dict) and the layer's saved record.

Shared experts: the first ``num_shared`` experts run for every token whatever the selector
scores (they hold the neurons that are active most often). The layer keeps its selector's
``num_shared`` equal to its own, so every mask the selector makes includes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.moe.accounting import ExpertAccounting
from moefy.moe.forward import ExpertForward, ExpertTrainingRecord, straight_through_gates
from moefy.moe.selectors import ExpertSelector, OracleSelector
from moefy.moe.weights import ExpertWeights, check_slots

__all__ = ["ExpertTrainingRecord", "MoEFFN", "check_slots", "straight_through_gates"]


class MoEFFN(ExpertWeights, ExpertForward, ExpertAccounting, nn.Module):
    """A mixture-of-experts FFN that equals the dense FFN when every expert runs.

    Each forward asks the ``selector`` submodule (default: :class:`OracleSelector` with every
    expert) which experts each token runs, unless a selection was given with
    :meth:`select_next`, then gathers each expert's tokens, computes only those, and scatters
    the outputs back (grouped dispatch). A running tally of selections gives the measured active
    fraction and FLOPs. The first ``num_shared`` experts are shared: in every selection.

    Args:
        d_model: D.
        num_experts: E.
        expert_size: S.
        gated: gated FFN (``act(gate) * up``).
        act: the activation module of the dense FFN.
        in_bias: keep input biases ``b_in``.
        out_bias: keep the down bias ``b_out``.
        selector: the expert selector; default every expert (oracle with no top-k).
        num_shared: the first ``num_shared`` experts are shared (always run), in [0, E).
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
        num_shared: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.d_model, self.num_experts, self.expert_size = d_model, num_experts, expert_size
        self.num_shared = num_shared
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
            "num_shared": self.num_shared,
            "selector": self.selector.to_dict(),
        }

    def __setattr__(self, name: str, value: Any) -> None:
        # The selector always knows the layer's shared experts: set when either changes.
        if name == "num_shared":
            value = _check_num_shared(value, self.num_experts)
            selector = self._modules.get("selector")
            if selector is not None:
                selector.num_shared = value
        elif name == "selector" and isinstance(value, ExpertSelector):
            value.num_shared = self.num_shared
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        shared = f", shared={self.num_shared}" if self.num_shared else ""
        return (
            f"d_model={self.d_model}, experts={self.num_experts}, expert_size={self.expert_size}"
            f"{shared}, gated={self.gated}, layer={self.layer_index}"
        )


def _check_num_shared(value: Any, num_experts: int) -> int:
    """``value`` as a number of shared experts of a layer of ``num_experts``: in [0, E)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_experts:
        raise MoefyError(
            f"num_shared={value!r} must be an integer in [0, {num_experts}): at least one of "
            f"the {num_experts} experts must be routed"
        )
    return value
