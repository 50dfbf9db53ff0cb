"""MoE-aware fine-tuning: train a moefied model with its routers in the loop (LTE-style).

Shape legend:
    N: tokens, E: experts

While :class:`RoutedTraining` is open, every :class:`~moefy.moe.MoEFFN` of the model runs its
training forward (:meth:`~moefy.moe.MoEFFN.record_training`): each token's output is the sum of
the experts its router selects (the rule and budget set for inference: top-k or dynamic k), so
the language-model and distillation losses train the experts and the rest of the network to work
with the experts the router will choose, while every expert's true output norm is computed too.
Two terms join the loss (:func:`finetune` adds them):

- the router loss: each learned router fits the true norms of the experts as they change
  (ListNet on log norms, the loss :func:`~moefy.routing.train_routers` uses by default); the
  router's input is detached, so this term trains the router only;
- with ``straight_through`` (a temperature), the language-model and distillation losses train
  the routers as well: the selection stays hard in the forward, and the backward passes each
  expert's contribution to the loss to its router score through a sigmoid around the token's
  selection boundary (:func:`~moefy.moe.module.straight_through_gates`). With the rest of the
  model frozen (``FinetuneConfig.train="routers"``) this fits the routers to what the loss needs
  (which experts the output cannot do without), not only to the experts' norms;
- the efficiency term: the Hoyer measure of each token's expert norms, (sum_e n_e)^2 /
  (E * sum_e n_e^2) in [1/E, 1], which pushes a token's output mass into fewer experts, so
  dynamic k (a share tau of the mass) keeps fewer of them and top-k loses less.

LTE (Zheng et al. 2024) trains sigmoid gates with an efficiency loss and then thresholds them;
here selection stays hard and equal to inference, and the efficiency pressure acts on what the
experts compute, as D2DMoE's Hoyer penalty does on neurons.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.finetune.regularizers import hoyer_penalty
from moefy.moe.convert import moe_layers
from moefy.moe.module import ExpertTrainingRecord


class RoutedTraining:
    """Context manager: the model's MoE layers train with their selection in the loop.

    Example:
        >>> with RoutedTraining(model) as routed:
        ...     loss = lm_loss(model(ids)) + routed.router_loss() + 0.1 * routed.efficiency()
    """

    def __init__(self, model: nn.Module, *, straight_through: float | None = None) -> None:
        self.layers = moe_layers(model)
        if not self.layers:
            raise MoefyError("routed training needs a moefied model (moefy convert / moefy_)")
        self.records: list[ExpertTrainingRecord] = []
        self.straight_through = straight_through

    def __enter__(self) -> RoutedTraining:
        for moe in self.layers:
            moe.record_training(self.records, straight_through=self.straight_through)
        return self

    def __exit__(self, *exc: object) -> None:
        for moe in self.layers:
            moe.record_training(None)
        self.records.clear()

    def take(self) -> list[ExpertTrainingRecord]:
        """The records of the forwards since the last call (one per MoE layer and forward)."""
        taken = list(self.records)
        self.records.clear()
        return taken


def router_loss(records: list[ExpertTrainingRecord]) -> torch.Tensor:
    """Mean over layers with a learned router of its ListNet loss against the true norms.

    Returns a zero tensor when no layer has a learned router.
    """
    from moefy.routing.losses import ROUTER_LOSSES
    from moefy.routing.routers import LOG_NORM_FLOOR

    losses = [
        ROUTER_LOSSES["listwise"](
            r.predicted_log_norms.float(),
            r.norms.detach().float().clamp_min(LOG_NORM_FLOOR).log(),
        )
        for r in records
        if r.predicted_log_norms is not None
    ]
    if not losses:
        device = records[0].norms.device if records else None
        return torch.zeros((), device=device)
    return torch.stack(losses).mean()


def efficiency_penalty(records: list[ExpertTrainingRecord]) -> torch.Tensor:
    """Mean over layers and tokens of the Hoyer measure of the expert norms, in [1/E, 1]."""
    return hoyer_penalty([r.norms for r in records])


def active_share(records: list[ExpertTrainingRecord]) -> tuple[int, int]:
    """(experts run, expert slots) summed over the records: their ratio is the active share."""
    return sum(int(r.mask.sum()) for r in records), sum(r.mask.numel() for r in records)


def router_hits(records: list[ExpertTrainingRecord]) -> tuple[int, int]:
    """(selected experts among each token's true best, experts selected) over the records of
    learned routers: their ratio is the router's recall of the true top-k, k being what it chose
    per token (top-k or dynamic k). The ListNet loss cannot show this: its floor is the entropy
    of the true norm shares."""
    hits = total = 0
    for r in records:
        if r.predicted_log_norms is None:
            continue
        with torch.no_grad():
            chosen = r.mask.sum(dim=-1, keepdim=True)  # (N, 1) experts run per token
            rank = r.norms.argsort(dim=-1, descending=True).argsort(dim=-1)  # (N, E) 0 = best
            hits += int((r.mask & (rank < chosen)).sum())
            total += int(chosen.sum())
    return hits, total


def all_experts_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of a moefied model with every expert running: the dense model, exactly.

    The natural distillation teacher for routed training: the student learns to match, with the
    experts its router picks, what the whole FFN computed.
    """
    from moefy.moe.selectors import OracleSelector

    teacher = copy.deepcopy(model)
    for moe in moe_layers(teacher):
        moe.selector = OracleSelector(moe.num_experts)
    return teacher.eval().requires_grad_(False)
