"""Routers: cheap per-token predictors of which experts matter, and the rules that pick them.

Shape legend:
    N: tokens, D: model width, E: experts, H: hidden width of the MLP router, S: expert size

A router is an :class:`~moefy.moe.ExpertSelector` subclass held by :class:`~moefy.moe.MoEFFN` as
its ``selector`` submodule, so its weights sit in the model's state dict and are saved with it.
Its :meth:`Router.scores` are predicted expert output norms ``||W_out_e h_e||`` (non-negative;
with the default ``listwise`` training loss, up to a per-token scale, which no rule depends on),
which the selection rules in :data:`moefy.moe.selectors.SELECTION_RULES` (shared with the
oracle) turn into a mask:

- ``topk``: the ``k`` (or ``keep`` share of E) highest scores, as every selector;
- ``dynamic``: per token, the smallest set of experts whose scores reach a share ``tau`` of the
  token's total (DSTI / D2DMoE dynamic k);
- ``relative``: the experts scoring at least ``(1 - tau)`` times the token's largest score.

Rule and ``tau`` are selector settings, saved in :meth:`Router.to_dict`; :func:`set_routing`
sets them for a whole model, with one value for every layer or a per-layer budget list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.moe.selectors import TOPK, RuleSelector, register_selector
from moefy.registry import Registry
from moefy.validate import keep_or_fraction

if TYPE_CHECKING:
    from moefy.moe.module import MoEFFN

# Floor of predicted norms before taking logs (norms are in the model's activation units).
LOG_NORM_FLOOR = 1e-6


class Router(RuleSelector):
    """Base of the learned and similarity routers: scores experts from the input alone.

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
    # Fitted in one step by ``fit(x, norms, moe)`` instead of trained (moefy.routing.closed_form).
    closed_form: ClassVar[bool] = False

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
        super().__init__(num_experts, k=k, fraction=fraction, rule=rule, tau=tau)
        self.d_model = int(d_model)

    def predict_log_norms(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, E) predicted ``log ||W_out_e h_e||`` (what training fits; the
        ``listwise`` loss fixes it up to a per-token constant)."""
        raise NotImplementedError

    def scores(self, x: torch.Tensor, moe: MoEFFN | None = None) -> torch.Tensor:
        """(N, D) -> (N, E) predicted expert output norms (non-negative)."""
        return self.predict_log_norms(x).exp()

    def score_layers(self) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
        """This router as linear layers (weight (O, I), bias or None) with ReLU between them,
        whose last output orders the experts as :meth:`scores` does; None when it is not one
        (subclasses that are say so, and the kernels then route and run experts in one call)."""
        return None

    def kernel_route(self) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor | None]]] | None:
        # the fused kernel's top-k knows neither shared experts nor a load bias
        if self.rule != TOPK or self.selects_all() or self.num_shared or self.load_bias is not None:
            return None
        layers = self.score_layers()
        return None if layers is None else (self.num_selected(), layers)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens in the router's dtype (a bf16 model may carry an fp32 router)."""
        weight = next(iter(self.parameters()), None)
        if weight is None:
            weight = next(iter(self.buffers()))
        return x.to(weight.dtype)

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


# router name (its selector_type) -> router class; ``RouterConfig.router`` and the CLI read it
ROUTERS: Registry[type[Router]] = Registry("router")


def register_router(cls: type[Router]) -> type[Router]:
    """Register a router class under its ``selector_type`` (as a selector too, so saved models
    rebuild it); the first line of its docstring is its help.

    Example:
        >>> @register_router
        ... class MyRouter(Router):
        ...     '''Scores experts by something new.'''
        ...     selector_type = "mine"
    """
    register_selector(cls)
    summary = (cls.__doc__ or "").strip().splitlines()
    ROUTERS.register(cls.selector_type, cls, help=summary[0] if summary else "")
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

    def score_layers(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(self.centroids, None)]  # softmax keeps the order of the similarities

    def scores(self, x: torch.Tensor, moe: MoEFFN | None = None) -> torch.Tensor:
        # softmax, not exp: same order, and no overflow on large activations
        return self.predict_log_norms(x).softmax(dim=-1)

    def flops_per_token(self, d_model: int) -> float:
        return 2.0 * d_model * self.num_experts


@register_router
class MLPRouter(Router):
    """A small MLP, D -> H -> E with ReLU, predicting each expert's log output norm.

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

    def score_layers(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        first, last = self.net[0], self.net[2]
        return [(first.weight, first.bias), (last.weight, last.bias)]

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
    """The cheapest learned router: one linear map D -> E predicting log output norms."""

    selector_type = "linear"

    def __init__(self, num_experts: int, d_model: int, **settings: Any) -> None:
        super().__init__(num_experts, d_model, **settings)
        self.proj = nn.Linear(d_model, num_experts)

    def predict_log_norms(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self._cast(x))  # (N, E)

    def score_layers(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(self.proj.weight, self.proj.bias)]

    def flops_per_token(self, d_model: int) -> float:
        return 2.0 * d_model * self.num_experts + self.num_experts


def attach_routers(model: nn.Module, router: str, **settings: Any) -> list[Router]:
    """Give every MoE layer of ``model`` a fresh router of type ``router``.

    Args:
        model: a moefied model.
        router: a name in :data:`ROUTERS` (``centroid``, ``linear``, ``mlp``; the closed-form
            ``analytic`` and ``lstsq`` come unfitted: :func:`train_routers` fits them).
        **settings: constructor settings (``hidden``, ``fraction``, ``rule``, ``tau`` ...).

    Returns:
        The routers in layer order.

    Example:
        >>> attach_routers(model, "centroid", fraction=0.25)
    """
    from moefy.moe.convert import moe_layers

    router_class = ROUTERS.get(router).value
    layers = moe_layers(model)
    if not layers:
        raise MoefyError("the model has no MoE layers; call moefy_ first")
    routers = [router_class.for_layer(moe, **settings) for moe in layers]
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
    keep: float | Sequence[float] | None = None,
    tau: float | Sequence[float] | None = None,
    fraction: float | Sequence[float] | None = None,
) -> int:
    """Set the selection rule of every MoE layer, with one budget or a budget per layer.

    Args:
        model: a moefied model whose layers hold rule selectors (a :class:`Router` or the
            oracle, see :class:`~moefy.moe.selectors.RuleSelector`; ``topk`` works with any).
        rule: ``topk``, ``dynamic`` or ``relative``.
        k: top-k budget in experts, a value or one per layer.
        keep: top-k budget as the share of experts kept per token, in (0, 1], a value or one
            per layer.
        tau: dynamic / relative budget in (0, 1], a value or one per layer.
        fraction: former name of ``keep`` (deprecated).

    Returns:
        The number of layers changed.

    Raises:
        MoefyError: no MoE layers, a budget list of the wrong length, tau outside (0, 1], a
            non-topk rule on a selector without rules (then no layer is changed), ``keep``
            and ``fraction`` both given.

    Example:
        >>> set_routing(model, "topk", keep=0.25)
        30
        >>> set_routing(model, "dynamic", tau=[0.9] * 10 + [0.8] * 20)
        30
    """
    from moefy.moe.convert import moe_layers

    keep = keep_or_fraction(keep, fraction, where="set_routing")
    layers = moe_layers(model)
    if not layers:
        raise MoefyError("the model has no MoE layers; call moefy_ first")
    n = len(layers)
    ks, keeps, taus = (_per_layer(*item, n) for item in (("k", k), ("keep", keep), ("tau", tau)))
    previous = [m.selector.to_dict() for m in layers]
    try:
        for moe, k_i, keep_i, tau_i in zip(layers, ks, keeps, taus, strict=True):
            _set_layer_rule(moe, rule, k_i, keep_i, tau_i)
    except MoefyError:
        restore_selection(layers, previous)
        raise
    return n


def _set_layer_rule(moe: MoEFFN, rule: str, k: Any, keep: Any, tau: Any) -> None:
    selector = moe.selector
    if isinstance(selector, RuleSelector):
        selector.set_rule(rule, tau)
    elif rule != TOPK:
        raise MoefyError(
            f"layer {moe.layer_index} has a {selector.selector_type!r} selector; the "
            f"{rule} rule needs a router or the oracle (attach_routers or train_routers)"
        )
    if rule == TOPK:
        selector.set_topk(k=k, fraction=keep)


def restore_selection(layers: Sequence[MoEFFN], saved: Sequence[dict[str, Any]]) -> None:
    """Put back each layer's top-k budget and rule from its selector's ``to_dict()``.

    Example:
        >>> saved = [moe.selector.to_dict() for moe in layers]
        >>> restore_selection(layers, saved)
    """
    for moe, old in zip(layers, saved, strict=True):
        moe.selector.set_topk(k=old["k"], fraction=old["fraction"])
        if isinstance(moe.selector, RuleSelector):
            moe.selector.set_rule(old.get("rule", TOPK), old.get("tau"))
