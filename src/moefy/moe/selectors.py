"""Expert selectors: which experts each token runs.

Shape legend:
    N: tokens, D: model width, E: experts

A selector is an ``nn.Module`` held by :class:`moefy.moe.MoEFFN` as its ``selector`` submodule,
so whatever it learns (a router's weights) sits in the model's state dict and is saved with it.
It scores experts per token and keeps the top k; a :class:`RuleSelector` (the oracle, the
learned routers of :mod:`moefy.routing`) can also keep a per-token number of experts by another
rule of :data:`SELECTION_RULES` (dynamic k, relative to max).

Two registries, one entry per thing:

- :data:`SELECTORS`: selector classes by ``selector_type``, which is how a saved model rebuilds
  them. A learned router is one subclass that overrides :meth:`ExpertSelector.scores` (and
  :meth:`ExpertSelector.to_dict` / :meth:`ExpertSelector.from_dict` for its extra settings) plus
  :func:`register_selector`.
- :data:`SELECTION_RULES`: how a :class:`RuleSelector` turns scores into a mask. A new rule is
  one :class:`SelectionRule` subclass plus one ``SELECTION_RULES.register`` call.

Shared experts: a selector's ``num_shared`` (kept equal to its layer's by
:class:`moefy.moe.MoEFFN`) first experts are in every mask it makes. ``k`` and ``keep`` count all
experts, shared ones included, and the effective k is ``max(k, num_shared)``: top-k keeps the
shared experts plus the ``k - num_shared`` best routed ones; the ``tau`` rules run over the
routed experts' scores, and the shared experts are added.

Load balancing: an optional (E,) ``load_bias`` buffer (:meth:`ExpertSelector.set_load_bias`) is
added to the scores for the top-k choice only (DeepSeek-V3's auxiliary-loss-free balancing).

This module knows the MoE layer only through :class:`ExpertLayer` (what a selector reads), so it
does not import :mod:`moefy.moe.module`.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.kernels.reference import top_k_mask
from moefy.moe.rules import (
    DYNAMIC,
    K_BUDGET,
    RELATIVE,
    SELECTION_RULES,
    TOPK,
    SelectionRule,
    check_tau,
    dynamic_k_mask,
    relative_to_max_mask,
    rule_budget,
)
from moefy.registry import Registry

__all__ = [
    "DYNAMIC",
    "RELATIVE",
    "SELECTION_RULES",
    "SELECTORS",
    "TOPK",
    "ExpertLayer",
    "ExpertSelector",
    "OracleSelector",
    "RuleSelector",
    "SelectionRule",
    "check_tau",
    "dynamic_k_mask",
    "register_selector",
    "relative_to_max_mask",
    "selection_mask",
    "selector_from_dict",
    "with_shared",
]


class ExpertLayer(Protocol):
    """What a selector may read of the MoE layer it selects for (a :class:`moefy.moe.MoEFFN`)."""

    d_model: int
    num_experts: int
    expert_size: int

    def expert_norms(self, x: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(N, D) tokens -> (N, E) true output norm of every expert."""
        ...


# Modules of moefy whose import registers more selectors (kept lazy: they import this one).
_BUILTIN_SELECTOR_MODULES = ("moefy.routing",)


def _load_builtin_selectors() -> None:
    for module in _BUILTIN_SELECTOR_MODULES:  # registers the learned routers
        importlib.import_module(module)


SELECTORS: Registry[type[ExpertSelector]] = Registry(
    "expert selector", load=_load_builtin_selectors
)


def register_selector(cls: type[ExpertSelector]) -> type[ExpertSelector]:
    """Register a selector class under its ``selector_type`` (a class decorator).

    Registering a type name again replaces the earlier class.

    Example:
        >>> @register_selector
        ... class FirstExperts(ExpertSelector):
        ...     selector_type = "first"
        ...     def scores(self, x, moe):
        ...         return -torch.arange(self.num_experts, dtype=x.dtype).expand(len(x), -1)
    """
    name = cls.selector_type
    if not name:
        raise MoefyError(f"{cls.__name__} needs a non-empty selector_type to be registered")
    doc = (cls.__doc__ or "").strip().splitlines()
    return SELECTORS.register(name, cls, help=doc[0] if doc else "", overwrite=True)


class ExpertSelector(nn.Module):
    """Base selector: score experts per token, keep the top ``k`` (or ``fraction`` of E).

    With neither ``k`` nor ``fraction`` every expert runs (the MoE equals the dense FFN).

    Args:
        num_experts: E of the layer.
        k: experts per token, 1 <= k <= E, shared experts included.
        fraction: share of experts per token, in (0, 1]; k = round(fraction * E), at least 1.

    Attributes:
        num_shared: the first ``num_shared`` experts are in every mask (the layer's shared
            experts; :class:`moefy.moe.MoEFFN` sets it).
        load_bias: (E,) float32 added to the scores for the top-k choice, or None.

    Example:
        >>> sel = OracleSelector(64, fraction=0.25)
        >>> sel.num_selected()
        16
    """

    selector_type: ClassVar[str] = ""

    def __init__(
        self, num_experts: int, *, k: int | None = None, fraction: float | None = None
    ) -> None:
        super().__init__()
        self.num_experts = int(num_experts)
        self.num_shared = 0
        self.register_buffer("load_bias", None)
        self.k: int | None = None
        self.fraction: float | None = None
        self.set_topk(k=k, fraction=fraction)

    def set_load_bias(self, bias: torch.Tensor | None) -> None:
        """Add ``bias`` to the scores whenever the top-k experts are chosen (None: no bias).

        The bias changes which experts are chosen, never the scores the tau rules see; it is a
        buffer, so it is saved with the model.

        Args:
            bias: (E,) finite floats, or None.

        Raises:
            MoefyError: wrong shape or non-finite values.

        Example:
            >>> sel.set_load_bias(torch.zeros(sel.num_experts))
        """
        if bias is None:
            self.load_bias = None
            return
        if (
            not isinstance(bias, torch.Tensor)
            or bias.shape != (self.num_experts,)
            or not bias.is_floating_point()
            or not bool(torch.isfinite(bias).all())
        ):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise MoefyError(
                f"a load bias is {self.num_experts} finite floats (one per expert), got {shape}"
            )
        self.load_bias = bias.detach().to(torch.float32).clone()

    def set_topk(self, k: int | None = None, fraction: float | None = None) -> None:
        """Change how many experts run per token (both ``None``: all of them).

        Raises:
            MoefyError: both given, k outside [1, E], or fraction outside (0, 1].
        """
        if k is not None and fraction is not None:
            raise MoefyError("give k or fraction of experts, not both")
        if k is not None and (
            isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts
        ):
            raise MoefyError(
                f"k={k!r} experts is out of range: the layer has 1..{self.num_experts}"
            )
        if fraction is not None and not 0.0 < float(fraction) <= 1.0:
            raise MoefyError(f"fraction={fraction!r} of experts must be in (0, 1]")
        self.k = k
        self.fraction = None if fraction is None else float(fraction)

    def num_selected(self) -> int:
        """Experts each token runs under the current top-k setting, shared ones included: at
        least ``num_shared``."""
        if self.k is not None:
            chosen = self.k
        elif self.fraction is not None:
            chosen = min(
                self.num_experts, max(1, math.floor(self.fraction * self.num_experts + 0.5))
            )
        else:
            chosen = self.num_experts
        return max(chosen, self.num_shared)

    # True when scores come from every expert's activations (see OracleSelector).
    scores_from_expert_hidden = False
    # True when scores are predicted log norms that training can fit (learned routers).
    trainable: ClassVar[bool] = False

    def scores(self, x: torch.Tensor, moe: ExpertLayer) -> torch.Tensor:
        """(N, D) tokens -> (N, E) expert scores, higher runs first."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, moe: ExpertLayer) -> torch.Tensor:
        """(N, D) tokens -> (N, E) boolean mask of the experts to run."""
        if self.selects_all():  # every expert runs; no need to score them
            return torch.ones(x.shape[0], self.num_experts, dtype=torch.bool, device=x.device)
        return self.mask_from_scores(self.scores(x, moe))

    def mask_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(N, E) scores -> (N, E) boolean mask of the experts this selector's setting keeps."""
        return self.topk_mask(scores)

    def selects_all(self) -> bool:
        """True when every expert runs for every token."""
        return self.num_selected() >= self.num_experts

    def topk_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """(N, E) scores -> (N, E) boolean mask of each token's top-k experts: the shared
        experts and the best ``k - num_shared`` routed ones by score (+ ``load_bias``).

        Ties go to the lower expert index and NaN counts as largest, the rule of the kernels'
        fused routing (:func:`moefy.kernels.reference.top_k_mask`), so the plain and kernel paths
        select the same experts."""
        if self.load_bias is not None:
            scores = scores.float() + self.load_bias.to(scores.device)  # (N, E)
        ns = self.num_shared
        routed = top_k_mask(scores[:, ns:], self.num_selected() - ns)  # (N, E - ns)
        return with_shared(routed, ns)

    def kernel_route(self) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor | None]]] | None:
        """``(k, layers)`` when this selector is a top-k over linear layers with ReLU between
        them (see :func:`moefy.kernels.routed_expert_ffn`), which a kernel can run in the same
        call as the experts; None otherwise (the default: score with :meth:`forward`). Must be
        None with shared experts or a load bias (the fused kernel knows neither)."""
        return None

    def flops_per_token(self, d_model: int) -> float:
        """FLOPs per token the selection itself costs at inference (0 unless overridden)."""
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        """Settings that rebuild this selector with :meth:`from_dict` (weights are in state;
        ``"load_bias": true`` says the state holds a load bias)."""
        data: dict[str, Any] = {"type": self.selector_type, "k": self.k, "fraction": self.fraction}
        if self.load_bias is not None:
            data["load_bias"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, num_experts: int, d_model: int) -> ExpertSelector:
        """Rebuild a selector of this class from :meth:`to_dict` output."""
        return cls(num_experts, k=data.get("k"), fraction=data.get("fraction"))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}{self._shared_repr()}, selected={self.num_selected()}"

    def _shared_repr(self) -> str:
        return f", shared={self.num_shared}" if self.num_shared else ""


class RuleSelector(ExpertSelector):
    """A selector whose scores are masses (true or predicted expert norms), picked by a rule.

    Besides top-k it selects by ``dynamic`` k (per token, the smallest set of experts whose
    scores reach a share ``tau`` of the total; DSTI / D2DMoE) or ``relative`` to the best expert
    (scores at least ``(1 - tau)`` times the token's largest); see :data:`SELECTION_RULES`.

    Args:
        num_experts: E.
        k, fraction: top-k setting (see :class:`ExpertSelector`).
        rule: a key of :data:`SELECTION_RULES` (``topk``, ``dynamic``, ``relative``).
        tau: share for ``dynamic`` / ``relative``, in (0, 1].

    Example:
        >>> sel = OracleSelector(64, rule="dynamic", tau=0.9)
        >>> sel.selects_all()
        False
    """

    def __init__(
        self,
        num_experts: int,
        *,
        k: int | None = None,
        fraction: float | None = None,
        rule: str = TOPK,
        tau: float | None = None,
    ) -> None:
        super().__init__(num_experts, k=k, fraction=fraction)
        self.rule = TOPK
        self.tau: float | None = None
        self.set_rule(rule, tau)

    def set_rule(self, rule: str, tau: float | None = None) -> None:
        """Choose the selection rule; ``dynamic`` and ``relative`` need ``tau`` in (0, 1].

        Raises:
            MoefyError: unknown rule, tau missing or out of range.
        """
        self.tau = rule_budget(rule, tau)
        self.rule = rule

    def _rule(self) -> SelectionRule:
        return SELECTION_RULES.get(self.rule).value

    def selects_all(self) -> bool:
        return self._rule().budget == K_BUDGET and super().selects_all()

    def forward(self, x: torch.Tensor, moe: ExpertLayer) -> torch.Tensor:
        """(N, D) tokens -> (N, E) boolean mask of the experts to run."""
        if self.selects_all():
            return torch.ones(x.shape[0], self.num_experts, dtype=torch.bool, device=x.device)
        with torch.no_grad():
            scores = self.scores(x, moe)  # (N, E)
        return self.mask_from_scores(scores)

    def mask_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(N, E) scores (masses) -> (N, E) mask by this selector's rule: top-k as
        :meth:`topk_mask`, another rule over the routed experts' scores, plus the shared
        experts."""
        if self.rule == TOPK:
            return self.topk_mask(scores)
        ns = self.num_shared
        routed = self._rule().mask(scores[:, ns:], k=self.num_selected() - ns, tau=self.tau)
        return with_shared(routed, ns)  # (N, E)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "rule": self.rule, "tau": self.tau}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, num_experts: int, d_model: int) -> ExpertSelector:
        return cls(
            num_experts,
            k=data.get("k"),
            fraction=data.get("fraction"),
            rule=data.get("rule", TOPK),
            tau=data.get("tau"),
        )

    def extra_repr(self) -> str:
        k_budget = self._rule().budget == K_BUDGET
        budget = f"selected={self.num_selected()}" if k_budget else f"tau={self.tau}"
        return f"experts={self.num_experts}{self._shared_repr()}, rule={self.rule}, {budget}"


@register_selector
class OracleSelector(RuleSelector):
    """Runs the experts with the largest true output norm ``||W_out_e h_e||`` per token.

    An analysis tool: finding the norms computes every expert, so it shows the best any router
    could do with the same k (or the same dynamic-k share tau), not a speed-up. Its own cost is
    not counted in FLOPs.
    """

    selector_type = "oracle"

    @property
    def scores_from_expert_hidden(self) -> bool:  # type: ignore[override]
        # Top-k: MoEFFN reuses the scored activations for the output. The dynamic rules go
        # through forward (the selected experts are computed a second time).
        return self.rule == TOPK

    def scores(self, x: torch.Tensor, moe: ExpertLayer) -> torch.Tensor:
        return moe.expert_norms(x)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if self.rule == TOPK:  # the format of oracle selectors saved before dynamic k
            del data["rule"], data["tau"]
        return data


def selector_from_dict(data: dict[str, Any], *, num_experts: int, d_model: int) -> ExpertSelector:
    """Rebuild a registered selector from its :meth:`ExpertSelector.to_dict` output.

    Raises:
        MoefyError: unknown selector type.
    """
    kind = data.get("type") if isinstance(data, dict) else None
    if not isinstance(kind, str) or kind not in SELECTORS:  # lookup imports the routers first
        raise MoefyError(
            f"unknown expert selector {kind!r} (known: {sorted(SELECTORS)}); import the module "
            "that registers it before loading"
        )
    cls = SELECTORS.get(kind).value
    selector = cls.from_dict(data, num_experts=num_experts, d_model=d_model)
    if data.get("load_bias"):  # a buffer the state dict fills (built on meta when loading)
        selector.load_bias = torch.zeros(num_experts, dtype=torch.float32)
    return selector


def with_shared(routed: torch.Tensor, num_shared: int) -> torch.Tensor:
    """A routed experts' (N, E - ns) mask with the ``num_shared`` shared experts put first.

    Example:
        >>> with_shared(torch.tensor([[False, True]]), 1)
        tensor([[ True, False,  True]])
    """
    if not num_shared:
        return routed
    shared = torch.ones(routed.shape[0], num_shared, dtype=torch.bool, device=routed.device)
    return torch.cat([shared, routed], dim=1)  # (N, E)


def selection_mask(selection: torch.Tensor, num_tokens: int, num_experts: int) -> torch.Tensor:
    """Normalise a given selection to an (N, E) boolean mask.

    Args:
        selection: a boolean mask (..., E) or an integer index tensor (..., k) of expert ids,
            whose leading dimensions hold ``num_tokens`` tokens.
        num_tokens: N.
        num_experts: E.

    Returns:
        (N, E) bool mask.

    Raises:
        MoefyError: wrong shape, dtype or expert ids out of range.
    """
    if selection.dtype == torch.bool:
        if selection.shape[-1] != num_experts or selection.numel() != num_tokens * num_experts:
            raise MoefyError(
                f"selection mask of shape {tuple(selection.shape)} does not fit {num_tokens} "
                f"tokens x {num_experts} experts"
            )
        return selection.reshape(num_tokens, num_experts)
    if selection.is_floating_point() or selection.is_complex():
        raise MoefyError("a selection is a boolean mask or an integer tensor of expert ids")
    if selection.ndim == 0 or selection.numel() % max(num_tokens, 1):
        raise MoefyError(
            f"selection index of shape {tuple(selection.shape)} does not fit {num_tokens} tokens"
        )
    index = selection.reshape(num_tokens, -1).long()  # (N, k)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_experts):
        raise MoefyError(f"selection has expert ids outside [0, {num_experts})")
    mask = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=selection.device)
    return mask.scatter_(1, index, True)
