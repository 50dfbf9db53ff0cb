"""A bias-free linear router per layer, fitted to moefy's own expert selection.

Shape legend:
    N: tokens, D: model width, E: experts of a moefy layer, E_r: routed experts, k: routed
    experts per token

Qwen2-MoE's router is one (E_r, D) matrix, no bias; its top-k runs on softmax probabilities.
moefy's selectors are anything (ridge routers with a bias, MLPs, the oracle's true norms), so
the export distils them:

1. On calibration tokens, each moefied layer's inputs x and the scores its selector ranks by
   (``target="router"``; ``"oracle"``: the true expert norms) are streamed into Gram sums; a
   ridge fit without bias, ``W = (X^T X + lam I)^-1 X^T T``, to the scores centred per token
   (softmax ignores a per-token shift, so the map need not spend itself on one).
2. The logits ``x W`` are scaled by ``s = spread / rms`` (rms: their per-token spread over
   experts on the fitting tokens, from the Gram sums): the softmax then gives every expert
   ~1/E_r, which the export undoes by folding E_r into the down projections, while the ranking
   (and so the top-k) is unchanged.
3. Held-out tokens measure what was lost: ``recall`` (share of moefy's chosen routed experts
   the exported router also chooses) and ``weight_error`` (mean |E_r p_e - 1| over the chosen
   experts: how far the probability weighting is from moefy's unweighted sum).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moefy.errors import MoefyError

if TYPE_CHECKING:
    from moefy.data.blocks import TokenBlocks
    from moefy.export.qwen2_moe import ExportPlan, LayerPlan

__all__ = ["DEFAULT_LOGIT_SPREAD", "ROUTER_TARGETS", "LayerRouterFit", "RouterFit", "fit_routers"]

# Per-token spread (rms over experts) of the exported logits: small enough that the softmax
# weights stay within ~0.1 % of 1/E_r, large enough that fp32 (and bf16) logits keep the order.
DEFAULT_LOGIT_SPREAD = 1e-3
# Ridge strength relative to the mean diagonal of X^T X.
DEFAULT_RIDGE = 1e-4
# Share of the calibration blocks held out to measure the fit.
HELD_OUT_SHARE = 0.25
ROUTER_TARGETS = ("router", "oracle")


@dataclass
class LayerRouterFit:
    """One layer's exported router and what it loses.

    Attributes:
        index: layer index.
        weight: (E_r, D) router weight, the logit scale included.
        scale: the logit scale s.
        recall: share of moefy's chosen routed experts the exported router chooses (held out).
        weight_error: mean |E_r p_e - 1| over the chosen experts (held out).
    """

    index: int
    weight: torch.Tensor
    scale: float = 1.0
    recall: float = 1.0
    weight_error: float = 0.0


@dataclass
class RouterFit:
    """The exported routers of a model.

    Attributes:
        layers: one :class:`LayerRouterFit` per moefied layer, in layer order.
        target: ``router`` or ``oracle``: what the routers were fitted to.
        n_tokens: fitting tokens (0 when every expert runs and nothing was fitted).
        held_out_tokens: tokens the recall and weight error were measured on.
    """

    layers: list[LayerRouterFit] = field(default_factory=list)
    target: str = "router"
    n_tokens: int = 0
    held_out_tokens: int = 0

    @property
    def mean_recall(self) -> float:
        """Recall averaged over layers."""
        return sum(f.recall for f in self.layers) / max(len(self.layers), 1)

    @property
    def mean_weight_error(self) -> float:
        """Weight error averaged over layers."""
        return sum(f.weight_error for f in self.layers) / max(len(self.layers), 1)

    def weights(self) -> dict[int, torch.Tensor]:
        """Layer index -> (E_r, D) router weight."""
        return {f.index: f.weight for f in self.layers}


def fit_routers(
    model: nn.Module,
    plan: ExportPlan,
    data: TokenBlocks | None,
    *,
    target: str = "router",
    logit_spread: float = DEFAULT_LOGIT_SPREAD,
    batch_size: int = 8,
) -> RouterFit:
    """Fit each moefied layer's bias-free linear router (see the module docstring).

    Layers where every routed expert runs get a zero router (every softmax weight is exactly
    1/E_r) and need no data.

    Args:
        model: the moefied model, with the routing to reproduce.
        plan: its :func:`moefy.export.qwen2_moe.plan_export` plan.
        data: calibration blocks (at least 2), or None when every expert runs.
        target: ``router`` (the model's own selector) or ``oracle`` (true expert norms).
        logit_spread: per-token rms of the exported logits.
        batch_size: blocks per forward pass.

    Returns:
        A :class:`RouterFit`.

    Raises:
        MoefyError: an unknown target, a spread that is not > 0, or routing to fit without
            (enough) data.

    Example:
        >>> fit = fit_routers(model, plan_export(model), blocks)
        >>> round(fit.mean_recall, 2)
        0.93
    """
    if target not in ROUTER_TARGETS:
        raise MoefyError(f"router target {target!r} is not one of {', '.join(ROUTER_TARGETS)}")
    if not (math.isfinite(logit_spread) and logit_spread > 0):
        raise MoefyError(f"the logit spread must be a finite number > 0, got {logit_spread}")
    layers = plan.moe_layers
    routed = [layer for layer in layers if not layer.selects_all()]
    zero = {
        layer.index: LayerRouterFit(layer.index, torch.zeros(layer.routed, layer.moe.d_model))
        for layer in layers
        if layer.selects_all()
    }
    if not routed:
        return RouterFit(layers=list(zero.values()), target=target)
    if data is None or data.num_blocks < 2:
        raise MoefyError(
            "fitting the exported routers needs calibration text of at least 2 blocks "
            "(--data/--tokens, or data=load_text(...).blocks(...))"
        )
    held = max(1, int(round(data.num_blocks * HELD_OUT_SHARE)))
    fit_ids, check_ids = data.input_ids[:-held], data.input_ids[-held:]
    sums = {layer.index: _GramSums(layer) for layer in routed}
    _stream(model, routed, fit_ids, batch_size, lambda i, x, t: sums[i].add(x, t), target)
    fits = {i: s.solve(logit_spread) for i, s in sums.items()}
    checks = {i: _FitCheck(fits[i], layer) for i, layer in zip(sums, routed, strict=True)}
    _stream(model, routed, check_ids, batch_size, lambda i, x, t: checks[i].add(x, t), target)
    done = {**zero, **{i: check.result() for i, check in checks.items()}}
    return RouterFit(
        layers=[done[layer.index] for layer in layers],
        target=target,
        n_tokens=fit_ids.numel(),
        held_out_tokens=check_ids.numel(),
    )


class _GramSums:
    """Streaming X^T X (D, D) and X^T T (D, E_r) of one layer, float64."""

    def __init__(self, layer: LayerPlan) -> None:
        D = layer.moe.d_model
        self.layer = layer
        self.xx = torch.zeros(D, D, dtype=torch.float64)
        self.xt = torch.zeros(D, layer.routed, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor, scores: torch.Tensor) -> None:
        x = x.double().cpu()  # (N, D)
        centred = scores.double().cpu()
        centred = centred - centred.mean(dim=1, keepdim=True)  # (N, E_r)
        self.xx += x.t() @ x
        self.xt += x.t() @ centred
        self.n += x.shape[0]

    def solve(self, spread: float) -> LayerRouterFit:
        """The ridge solution, scaled so the logits' per-token rms is ``spread``."""
        lam = DEFAULT_RIDGE * float(self.xx.diagonal().mean())
        system = self.xx + lam * torch.eye(self.xx.shape[0], dtype=torch.float64)
        weight = torch.linalg.solve(system, self.xt)  # (D, E_r)
        E = weight.shape[1]
        # mean over tokens of the variance over experts of x W, from the Gram sums
        total = (weight * (self.xx @ weight)).sum() / (self.n * E)
        row_sum = weight.sum(dim=1)  # (D,)
        mean_sq = row_sum @ self.xx @ row_sum / (self.n * E * E)
        rms = float((total - mean_sq).clamp_min(0).sqrt())
        scale = spread / rms if rms > 0 else 1.0
        return LayerRouterFit(self.layer.index, (weight.t() * scale).float(), scale=scale)


class _FitCheck:
    """Streaming recall and weight error of one fitted router on held-out tokens."""

    def __init__(self, fit: LayerRouterFit, layer: LayerPlan) -> None:
        self.fit, self.k = fit, layer.routed_k
        self.hits = self.chosen = 0
        self.error_sum = 0.0

    def add(self, x: torch.Tensor, scores: torch.Tensor) -> None:
        logits = x.float().cpu() @ self.fit.weight.t()  # (N, E_r)
        E = logits.shape[1]
        probs = torch.softmax(logits, dim=-1)
        top_p, top = probs.topk(self.k, dim=-1)  # (N, k)
        wanted = scores.float().cpu().topk(self.k, dim=-1).indices  # (N, k)
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
        self.hits += int(chosen.gather(1, wanted).sum())
        self.chosen += wanted.numel()
        self.error_sum += float((top_p * E - 1).abs().sum())

    def result(self) -> LayerRouterFit:
        self.fit.recall = self.hits / max(self.chosen, 1)
        self.fit.weight_error = self.error_sum / max(self.chosen, 1)
        return self.fit


def _stream(
    model: nn.Module,
    layers: list[LayerPlan],
    input_ids: torch.Tensor,
    batch_size: int,
    sink: Any,
    target: str,
) -> None:
    """Run the model on ``input_ids``; each layer's (N, D) inputs and (N, E_r) target scores
    go to ``sink(index, x, scores)``."""
    device = next(model.parameters()).device
    with _captured(layers, sink, target), torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            model(input_ids=input_ids[start : start + batch_size].to(device))


@contextlib.contextmanager
def _captured(layers: list[LayerPlan], sink: Any, target: str) -> Iterator[None]:
    """Forward pre-hooks on the MoE layers, removed on exit."""
    handles = []

    def hook_for(layer: LayerPlan):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, module.d_model)  # (N, D)
            sink(layer.index, x, target_scores(module, x, target))

        return hook

    try:
        for layer in layers:
            handles.append(layer.moe.register_forward_pre_hook(hook_for(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def target_scores(moe: Any, x: torch.Tensor, target: str = "router") -> torch.Tensor:
    """(N, D) -> (N, E_r): the routed experts' scores in the order moefy's selection uses.

    ``oracle``: true output norms. ``router``: what the layer's selector ranks by: a ridge
    router's unclamped predictions, a learned router's predicted log norms (the same order as
    its scores, in the units it was fitted in), otherwise its scores; plus its load bias.

    Example:
        >>> target_scores(moe, x).topk(4).indices  # moefy's 4 best routed experts per token
    """
    selector, ns = moe.selector, moe.num_shared
    if target == "oracle" or selector.scores_from_expert_hidden:
        scores = moe.expert_norms(x, dtype=torch.float32)
    elif hasattr(selector, "predictions"):
        scores = selector.predictions(x)
    elif hasattr(selector, "predict_log_norms") and selector.trainable:
        scores = selector.predict_log_norms(x)
    else:
        scores = selector.scores(x, moe)
    scores = scores.float()
    if target == "router" and selector.load_bias is not None:
        scores = scores + selector.load_bias.to(scores.device)
    return scores[:, ns:]
