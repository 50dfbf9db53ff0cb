"""Selection rules: how a :class:`moefy.moe.selectors.RuleSelector` turns per-token expert scores
into the experts that run.

Shape legend:
    N: tokens, E: experts

Each rule is a :class:`SelectionRule` registered once in :data:`SELECTION_RULES`; the selectors,
the routers' ``set_routing`` and the CLI read the names from there. A rule's budget is either
``k`` (experts per token, set with ``set_topk``) or ``tau`` (a share in (0, 1]).

Example, a new rule (one class, one register call):
    >>> class ThresholdRule(SelectionRule):
    ...     '''Experts whose score reaches tau times the mean score.'''
    ...     def mask(self, scores, *, k, tau):
    ...         return scores >= tau * scores.mean(dim=-1, keepdim=True)
    >>> SELECTION_RULES.register("threshold", ThresholdRule(), help="score >= tau x mean")
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from moefy.errors import MoefyError
from moefy.kernels.reference import top_k_mask
from moefy.registry import Registry

TOPK, DYNAMIC, RELATIVE = "topk", "dynamic", "relative"
K_BUDGET, TAU_BUDGET = "k", "tau"


class SelectionRule:
    """One way of choosing experts from (N, E) scores (masses: true or predicted norms).

    Attributes:
        budget: ``"k"`` when the number of experts per token sets the budget (the selector's
            top-k setting), ``"tau"`` when a share ``tau`` in (0, 1] does.
    """

    budget: ClassVar[str] = TAU_BUDGET

    def mask(self, scores: torch.Tensor, *, k: int, tau: float | None) -> torch.Tensor:
        """(N, E) scores -> (N, E) boolean mask of the experts to run.

        Args:
            scores: (N, E) expert scores, higher runs first.
            k: experts per token of the selector's top-k setting.
            tau: the selector's share, for rules with a ``tau`` budget (None otherwise).
        """
        raise NotImplementedError


class TopKRule(SelectionRule):
    """Each token's k highest-scoring experts (ties to the lower index, NaN counts as largest)."""

    budget = K_BUDGET

    def mask(self, scores: torch.Tensor, *, k: int, tau: float | None) -> torch.Tensor:
        return top_k_mask(scores, k)


class DynamicKRule(SelectionRule):
    """Per token, the fewest experts whose scores reach a share tau of the total (DSTI)."""

    def mask(self, scores: torch.Tensor, *, k: int, tau: float | None) -> torch.Tensor:
        return dynamic_k_mask(scores, float(tau))


class RelativeToMaxRule(SelectionRule):
    """Per token, the experts scoring at least (1 - tau) times the token's best score."""

    def mask(self, scores: torch.Tensor, *, k: int, tau: float | None) -> torch.Tensor:
        return relative_to_max_mask(scores, float(tau))


def dynamic_k_mask(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Per token, the smallest set of experts whose scores reach a share ``tau`` of the total.

    Args:
        scores: (N, E) non-negative scores (negative ones count as 0).
        tau: share in (0, 1].

    Returns:
        (N, E) bool mask; every token keeps at least its best expert.

    Example:
        >>> dynamic_k_mask(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 0.6)
        tensor([[ True,  True, False, False]])
    """
    scores = scores.clamp_min(0)
    ordered, order = scores.sort(dim=-1, descending=True, stable=True)  # (N, E)
    before = ordered.cumsum(dim=-1) - ordered  # (N, E): mass of the better experts
    keep_sorted = before < tau * ordered.sum(dim=-1, keepdim=True)
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)


def relative_to_max_mask(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Per token, the experts scoring at least ``(1 - tau)`` times the token's largest score.

    Args:
        scores: (N, E) non-negative scores (negative ones count as 0).
        tau: in (0, 1]; 1 keeps every expert.

    Returns:
        (N, E) bool mask; every token keeps at least its best expert.

    Example:
        >>> relative_to_max_mask(torch.tensor([[4.0, 3.0, 1.0]]), 0.5)
        tensor([[ True,  True, False]])
    """
    scores = scores.clamp_min(0)
    best = scores.max(dim=-1, keepdim=True).values  # (N, 1)
    return scores >= (1.0 - tau) * best


def check_tau(tau: Any) -> float:
    """``tau`` as a float in (0, 1].

    Raises:
        MoefyError: otherwise.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < float(tau) <= 1.0:
        raise MoefyError(f"tau={tau!r} must be a number in (0, 1]")
    return float(tau)


def rule_budget(rule: str, tau: Any) -> float | None:
    """Check ``tau`` against the budget of ``rule``: None for a k rule, a share for a tau rule.

    Raises:
        MoefyError: unknown rule, tau given to a k rule, or a missing or out-of-range tau.
    """
    budget = SELECTION_RULES.get(rule).value.budget
    if budget == K_BUDGET:
        if tau is not None:
            tau_rules = [e.name for e in SELECTION_RULES.entries() if e.value.budget == TAU_BUDGET]
            listed = " and ".join(
                [", ".join(tau_rules[:-1]), tau_rules[-1]] if tau_rules[1:] else tau_rules
            )
            raise MoefyError(f"tau applies to the {listed} rules, not {rule}")
        return None
    return check_tau(tau)


SELECTION_RULES: Registry[SelectionRule] = Registry("selection rule")
SELECTION_RULES.register(TOPK, TopKRule(), help="the k (or keep share of E) best experts per token")
SELECTION_RULES.register(
    DYNAMIC, DynamicKRule(), help="fewest experts reaching a share tau of the total score"
)
SELECTION_RULES.register(
    RELATIVE, RelativeToMaxRule(), help="experts scoring at least (1 - tau) x the best"
)
