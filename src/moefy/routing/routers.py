"""Routers: cheap per-token predictors of which experts matter, and the rules that pick them.

Shape legend:
    N: tokens, D: model width, E: experts, H: hidden width of the MLP router, S: expert size

A router is an :class:`~moefy.moe.ExpertSelector` subclass held by :class:`~moefy.moe.MoEFFN` as
its ``selector`` submodule, so its weights sit in the model's state dict and are saved with it.
Its :meth:`Router.scores` are predicted expert output norms ``||W_out_e h_e||`` (non-negative),
which the selection rules in :data:`SELECTION_RULES` turn into a mask:

- ``topk``: the ``k`` (or ``fraction`` of E) highest scores, as every selector;
- ``dynamic``: per token, the smallest set of experts whose scores reach a share ``tau`` of the
  token's total (DSTI / D2DMoE dynamic k);
- ``relative``: the experts scoring at least ``(1 - tau)`` times the token's largest score.

Rule and ``tau`` are selector settings, saved in :meth:`Router.to_dict`; :func:`set_routing`
sets them for a whole model, with one value for every layer or a per-layer budget list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.moe.selectors import ExpertSelector, register_selector

if TYPE_CHECKING:
    from moefy.moe.module import MoEFFN

TOPK, DYNAMIC, RELATIVE = "topk", "dynamic", "relative"
# Floor of predicted norms before taking logs (norms are in the model's activation units).
LOG_NORM_FLOOR = 1e-6


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
    ordered, order = scores.sort(dim=-1, descending=True)  # (N, E)
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


def _topk_rule(selector: Router, scores: torch.Tensor) -> torch.Tensor:
    return selector.topk_mask(scores)


def _dynamic_rule(selector: Router, scores: torch.Tensor) -> torch.Tensor:
    return dynamic_k_mask(scores, float(selector.tau))


def _relative_rule(selector: Router, scores: torch.Tensor) -> torch.Tensor:
    return relative_to_max_mask(scores, float(selector.tau))


# rule name -> (selector, (N, E) scores) -> (N, E) mask
SELECTION_RULES: dict[str, Callable[[Router, torch.Tensor], torch.Tensor]] = {
    TOPK: _topk_rule,
    DYNAMIC: _dynamic_rule,
    RELATIVE: _relative_rule,
}


def check_tau(tau: Any) -> float:
    """``tau`` as a float in (0, 1].

    Raises:
        MoefyError: otherwise.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < float(tau) <= 1.0:
        raise MoefyError(f"tau={tau!r} must be a number in (0, 1]")
    return float(tau)


class Router(ExpertSelector):
    """Base of the learned and similarity routers: scores experts, selects by a rule.

    Args:
        num_experts: E.
        d_model: D.
        k, fraction: top-k setting (see :class:`~moefy.moe.ExpertSelector`).
        rule: a key of :data:`SELECTION_RULES` (``topk``, ``dynamic``, ``relative``).
        tau: share for ``dynamic`` / ``relative``, in (0, 1].

    Example:
        >>> router = MLPRouter(64, 576, hidden=128)
        >>> router.set_rule("dynamic", tau=0.9)
        >>> mask = router(x, moe)  # (N, 64)
    """

    # Scores are predicted norms, so they can be trained against the true ones.
    trainable: ClassVar[bool] = True

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        *,
        k: int | None = None,
        fraction: float | None = None,
        rule: str = TOPK,
        tau: float | None = None,
    ) -> None:
        super().__init__(num_experts, k=k, fraction=fraction)
        self.d_model = int(d_model)
        self.rule = TOPK
        self.tau: float | None = None
        self.set_rule(rule, tau)

    def set_rule(self, rule: str, tau: float | None = None) -> None:
        """Choose the selection rule; ``dynamic`` and ``relative`` need ``tau`` in (0, 1].

        Raises:
            MoefyError: unknown rule, tau missing or out of range.
        """
        if rule not in SELECTION_RULES:
            raise MoefyError(f"unknown selection rule {rule!r} (known: {sorted(SELECTION_RULES)})")
        if rule == TOPK:
            if tau is not None:
                raise MoefyError("tau applies to the dynamic and relative rules, not topk")
        else:
            tau = check_tau(tau)
        self.rule, self.tau = rule, tau

    def selects_all(self) -> bool:
        return self.rule == TOPK and super().selects_all()

    def predict_log_norms(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, E) predicted ``log ||W_out_e h_e||`` (what training regresses)."""
        raise NotImplementedError

    def scores(self, x: torch.Tensor, moe: MoEFFN | None = None) -> torch.Tensor:
        """(N, D) -> (N, E) predicted expert output norms (non-negative)."""
        return self.predict_log_norms(x).exp()

    def forward(self, x: torch.Tensor, moe: MoEFFN) -> torch.Tensor:
        """(N, D) tokens -> (N, E) boolean mask of the experts to run."""
        if self.selects_all():
            return torch.ones(x.shape[0], self.num_experts, dtype=torch.bool, device=x.device)
        with torch.no_grad():
            scores = self.scores(x, moe)  # (N, E)
        return SELECTION_RULES[self.rule](self, scores)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens in the router's dtype (a bf16 model may carry an fp32 router)."""
        weight = next(iter(self.parameters()), None)
        if weight is None:
            weight = next(iter(self.buffers()))
        return x.to(weight.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "rule": self.rule, "tau": self.tau}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, num_experts: int, d_model: int) -> Router:
        return cls(
            num_experts,
            d_model,
            k=data.get("k"),
            fraction=data.get("fraction"),
            rule=data.get("rule", TOPK),
            tau=data.get("tau"),
            **cls._shape_settings(data),
        )

    @classmethod
    def _shape_settings(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Constructor settings beyond E and D that fix the weight shapes (MLP: hidden)."""
        return {}

    @classmethod
    def config_settings(cls, config: Any) -> dict[str, Any]:
        """Constructor settings this router type takes from a :class:`RouterConfig`."""
        return {}

    @classmethod
    def for_layer(cls, moe: MoEFFN, **settings: Any) -> Router:
        """A router for ``moe`` on its device, fitted where no training is needed."""
        return cls(moe.num_experts, moe.d_model, **settings).to(moe.w_in.device)

    def extra_repr(self) -> str:
        budget = f"selected={self.num_selected()}" if self.rule == TOPK else f"tau={self.tau}"
        return f"experts={self.num_experts}, rule={self.rule}, {budget}"


ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Register a router class (as a selector too, so saved models rebuild it).

    Example:
        >>> @register_router
        ... class MyRouter(Router):
        ...     selector_type = "mine"
    """
    register_selector(cls)
    ROUTERS[cls.selector_type] = cls
    return cls


@register_router
class CentroidRouter(Router):
    """MoEfication's similarity router: score = input . mean normalised input-weight row.

    The representative of expert e is the mean of its neurons' unit-length first input rows (gate
    rows for gated FFNs, up rows otherwise); nothing is trained. The raw similarity is turned
    into a positive score by a softmax over experts, which the dynamic rules treat as mass.
    """

    selector_type = "centroid"
    trainable = False

    def __init__(self, num_experts: int, d_model: int, **settings: Any) -> None:
        super().__init__(num_experts, d_model, **settings)
        self.register_buffer("centroids", torch.zeros(num_experts, d_model))  # (E, D)

    @classmethod
    def for_layer(cls, moe: MoEFFN, **settings: Any) -> Router:
        router = super().for_layer(moe, **settings)
        with torch.no_grad():
            rows = moe.w_in[:, : moe.expert_size].float()  # (E, S, D)
            real = (moe.perm >= 0).unsqueeze(-1).float()  # (E, S, 1)
            unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
            mean = (unit * real).sum(1) / real.sum(1).clamp_min(1)  # (E, D)
            router.centroids.copy_(mean)
        return router

    def predict_log_norms(self, x: torch.Tensor) -> torch.Tensor:
        return self._cast(x) @ self.centroids.t()  # (N, E) similarities

    def scores(self, x: torch.Tensor, moe: MoEFFN | None = None) -> torch.Tensor:
        # softmax, not exp: same order, and no overflow on large activations
        return self.predict_log_norms(x).softmax(dim=-1)

    def flops_per_token(self, d_model: int) -> float:
        return 2.0 * d_model * self.num_experts


@register_router
class MLPRouter(Router):
    """A small MLP, D -> H -> E with ReLU, regressing each expert's log output norm.

    The D2DMoE / DSTI recipe; trained by :func:`moefy.routing.train_routers`.

    Args:
        num_experts, d_model: E, D.
        hidden: H.
        **settings: selection settings of :class:`Router`.
    """

    selector_type = "mlp"

    def __init__(self, num_experts: int, d_model: int, *, hidden: int = 128, **settings: Any):
        super().__init__(num_experts, d_model, **settings)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise MoefyError(f"MLP router hidden width must be an integer >= 1, got {hidden!r}")
        self.hidden = hidden
        self.net = nn.Sequential(
            nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, num_experts)
        )

    def predict_log_norms(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self._cast(x))  # (N, E)

    def flops_per_token(self, d_model: int) -> float:
        # two matmuls, two bias adds, one ReLU
        H, E = self.hidden, self.num_experts
        return 2.0 * d_model * H + 2.0 * H * E + 2.0 * H + E

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "hidden": self.hidden}

    @classmethod
    def _shape_settings(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {"hidden": data.get("hidden", 128)}

    @classmethod
    def config_settings(cls, config: Any) -> dict[str, Any]:
        return {"hidden": config.hidden}


@register_router
class LinearRouter(Router):
    """The cheapest learned router: one linear map D -> E regressing log output norms."""

    selector_type = "linear"

    def __init__(self, num_experts: int, d_model: int, **settings: Any) -> None:
        super().__init__(num_experts, d_model, **settings)
        self.proj = nn.Linear(d_model, num_experts)

    def predict_log_norms(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self._cast(x))  # (N, E)

    def flops_per_token(self, d_model: int) -> float:
        return 2.0 * d_model * self.num_experts + self.num_experts


def attach_routers(model: nn.Module, router: str, **settings: Any) -> list[Router]:
    """Give every MoE layer of ``model`` a fresh router of type ``router``.

    Args:
        model: a moefied model.
        router: a key of :data:`ROUTERS` (``centroid``, ``linear``, ``mlp``).
        **settings: constructor settings (``hidden``, ``fraction``, ``rule``, ``tau`` ...).

    Returns:
        The routers in layer order.

    Example:
        >>> attach_routers(model, "centroid", fraction=0.25)
    """
    from moefy.moe.convert import moe_layers

    if router not in ROUTERS:
        raise MoefyError(f"unknown router {router!r} (known: {sorted(ROUTERS)})")
    layers = moe_layers(model)
    if not layers:
        raise MoefyError("the model has no MoE layers; call moefy_ first")
    routers = [ROUTERS[router].for_layer(moe, **settings) for moe in layers]
    for moe, new in zip(layers, routers, strict=True):
        moe.selector = new
    return routers


def _per_layer(name: str, value: Any, n_layers: int) -> list[Any]:
    """A scalar repeated per layer, or a per-layer budget list checked for length."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n_layers:
            raise MoefyError(
                f"{name} budget has {len(value)} values but the model has {n_layers} MoE layers"
            )
        return list(value)
    return [value] * n_layers


def set_routing(
    model: nn.Module,
    rule: str = TOPK,
    *,
    k: int | Sequence[int] | None = None,
    fraction: float | Sequence[float] | None = None,
    tau: float | Sequence[float] | None = None,
) -> int:
    """Set the selection rule of every MoE layer, with one budget or a budget per layer.

    Args:
        model: a moefied model whose layers hold :class:`Router` selectors (``topk`` also works
            with any selector).
        rule: ``topk``, ``dynamic`` or ``relative``.
        k, fraction: top-k budget, a value or one per layer.
        tau: dynamic / relative budget in (0, 1], a value or one per layer.

    Returns:
        The number of layers changed.

    Raises:
        MoefyError: no MoE layers, a budget list of the wrong length, tau outside (0, 1], a
            non-topk rule on a selector that is not a router (then no layer is changed).

    Example:
        >>> set_routing(model, "dynamic", tau=[0.9] * 10 + [0.8] * 20)
        30
    """
    from moefy.moe.convert import moe_layers

    layers = moe_layers(model)
    if not layers:
        raise MoefyError("the model has no MoE layers; call moefy_ first")
    n = len(layers)
    ks, fractions, taus = (
        _per_layer(*item, n) for item in (("k", k), ("fraction", fraction), ("tau", tau))
    )
    previous = [m.selector.to_dict() for m in layers]
    try:
        for moe, k_i, fraction_i, tau_i in zip(layers, ks, fractions, taus, strict=True):
            selector = moe.selector
            if isinstance(selector, Router):
                selector.set_rule(rule, tau_i)
            elif rule != TOPK:
                raise MoefyError(
                    f"layer {moe.layer_index} has a {selector.selector_type!r} selector; the "
                    f"{rule} rule needs a router (attach_routers or train_routers)"
                )
            if rule == TOPK:
                selector.set_topk(k=k_i, fraction=fraction_i)
    except MoefyError:
        for moe, old in zip(layers, previous, strict=True):
            moe.selector.set_topk(k=old["k"], fraction=old["fraction"])
            if isinstance(moe.selector, Router):
                moe.selector.set_rule(old["rule"], old["tau"])
        raise
    return n
