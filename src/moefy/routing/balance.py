"""Auxiliary-loss-free load balancing (DeepSeek-V3) and the union of experts a decode batch reads.

Shape legend:
    N: tokens, R: sampled calibration tokens per layer, E: experts, B: tokens in a decode batch,
    M: batches drawn

:func:`balance_load` fits, per MoE layer, a per-expert bias added to the selector's scores for
the top-k choice only (``selector.set_load_bias``): on batches of calibration tokens, every
routed expert's bias moves by ``rate`` (in units of the layer's mean score) towards the mean
load, ``b_e += rate * sign(mean load - load_e)``, for ``steps`` updates. Shared experts run for
every token and get no bias.

:func:`expert_union` measures what balancing costs a decode batch: B sequences decoding one
token each read the union of the experts their tokens select, and evening out the load evens
out which experts a random token picks, so that union grows (for independent tokens it is
largest when every expert is equally likely).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.moe.budget import collect_layer_inputs, layer_scores
from moefy.moe.convert import moe_layers
from moefy.moe.module import MoEFFN
from moefy.moe.selectors import TOPK
from moefy.validate import check_int, check_number

__all__ = [
    "BalanceReport",
    "ExpertUnion",
    "LayerBalance",
    "balance_load",
    "expert_union",
]

DEFAULT_STEPS = 200
# Bias change per update, as a share of the layer's mean routed-expert score.
DEFAULT_RATE = 0.01
DEFAULT_BATCH_TOKENS = 256
DEFAULT_UNION_BATCHES = (1, 4, 16)
DEFAULT_UNION_DRAWS = 256
# Tokens per chunk when scoring or selecting the sampled tokens.
_CHUNK = 256


@dataclass(frozen=True)
class LayerBalance:
    """One layer's load before and after balancing, on the sampled calibration tokens.

    Attributes:
        index: layer number.
        imbalance_before: most-loaded routed expert's load over the mean, without the bias.
        imbalance_after: the same with the fitted bias (1.0 is perfectly even).
    """

    index: int
    imbalance_before: float
    imbalance_after: float


@dataclass(frozen=True)
class BalanceReport:
    """What :func:`balance_load` did.

    Attributes:
        layers: per balanced layer (layers that run every expert are left out).
        steps: bias updates per layer.
        rate: bias change per update, in units of the layer's mean score.
        seconds: wall time.
    """

    layers: tuple[LayerBalance, ...]
    steps: int
    rate: float
    seconds: float

    @property
    def mean_imbalance(self) -> tuple[float, float]:
        """Mean over layers of (imbalance before, after)."""
        if not self.layers:
            return 1.0, 1.0
        n = len(self.layers)
        before = sum(layer.imbalance_before for layer in self.layers) / n
        return before, sum(layer.imbalance_after for layer in self.layers) / n


@dataclass(frozen=True)
class ExpertUnion:
    """Mean share of a layer's experts that at least one token of a batch selects.

    Attributes:
        batch_sizes: the B measured.
        layers: per layer, per batch size, the mean share of experts read.
    """

    batch_sizes: tuple[int, ...]
    layers: tuple[tuple[float, ...], ...]

    @property
    def mean(self) -> tuple[float, ...]:
        """Per batch size, the share averaged over layers."""
        n = max(1, len(self.layers))
        return tuple(
            sum(layer[j] for layer in self.layers) / n for j in range(len(self.batch_sizes))
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "batch_sizes": list(self.batch_sizes),
            "layers": [list(layer) for layer in self.layers],
            "mean": list(self.mean),
        }


def _layers(model: nn.Module) -> list[MoEFFN]:
    layers = moe_layers(model)
    if not layers:
        raise MoefyError("the model has no MoE layers; call moefy_ first")
    return layers


def _inputs(model, blocks, inputs, tokens_per_layer: int) -> list[torch.Tensor]:
    if inputs is not None:
        return list(inputs)
    if blocks is None:
        raise MoefyError("give calibration blocks (or the layers' sampled inputs)")
    return collect_layer_inputs(model, blocks, tokens_per_layer=tokens_per_layer)


def _check_balanceable(moe: MoEFFN) -> None:
    selector = moe.selector
    if getattr(selector, "rule", TOPK) != TOPK:
        raise MoefyError(
            f"layer {moe.layer_index} selects by the {selector.rule} rule; the load bias only "
            "moves the top-k choice: set_routing(model, 'topk', ...) first"
        )


def _loads(moe: MoEFFN, scores: torch.Tensor, routed: slice) -> torch.Tensor:
    """(N, E) scores -> (E_routed,) tokens per routed expert under the selector's setting."""
    return moe.selector.mask_from_scores(scores)[:, routed].sum(dim=0).float()


def _imbalance(loads: torch.Tensor) -> float:
    return float(loads.max() / loads.mean().clamp_min(1e-12))


def _fit_biases(
    routed_scores: torch.Tensor, k: int, steps: int, rate: float, batch: int, gen: torch.Generator
) -> torch.Tensor:
    """The auxiliary-loss-free updates for L layers at once.

    Args:
        routed_scores: (L, R, E_r) float32 scores of the routed experts on R tokens per layer.
        k: routed experts each token takes.
        steps, rate, batch: see :func:`balance_load`.
        gen: draws the batches (the same tokens for every layer).

    Returns:
        (L, E_r) biases. The updates take each token's k best by score + bias with ``topk``
        (ties, of measure zero, may break otherwise than the selector's stable rule).
    """
    layers, tokens, routed = routed_scores.shape
    step = rate * routed_scores.mean(dim=(1, 2)).unsqueeze(1)  # (L, 1) in units of the scores
    bias = routed_scores.new_zeros(layers, routed)
    ones = routed_scores.new_ones(layers, min(batch, tokens) * k)
    picks = torch.randint(tokens, (steps, min(batch, tokens)), generator=gen)
    for batch_picks in picks.to(routed_scores.device):
        biased = routed_scores[:, batch_picks] + bias.unsqueeze(1)  # (L, B, E_r)
        chosen = biased.topk(k, dim=-1).indices.flatten(1)  # (L, B*k)
        loads = torch.zeros_like(bias).scatter_add_(1, chosen, ones)  # (L, E_r)
        bias += step * torch.sign(loads.mean(dim=1, keepdim=True) - loads)
    return bias


def _balance_group(
    layers: Sequence[MoEFFN],
    scores: Sequence[torch.Tensor],
    steps: int,
    rate: float,
    batch: int,
    gen: torch.Generator,
) -> list[LayerBalance]:
    """Fit and set the load bias of layers with the same experts, shared experts and k."""
    shared = int(getattr(layers[0], "num_shared", 0))
    routed = slice(shared, layers[0].num_experts)
    before = []
    for moe, token_scores in zip(layers, scores, strict=True):
        moe.selector.set_load_bias(None)
        before.append(_imbalance(_loads(moe, token_scores, routed)))
    stacked = torch.stack([s[:, routed].float() for s in scores])  # (L, R, E_r)
    k = layers[0].selector.num_selected() - shared
    biases = _fit_biases(stacked, k, steps, rate, batch, gen)  # (L, E_r)
    results = []
    for moe, token_scores, bias, old in zip(layers, scores, biases, before, strict=True):
        full = torch.zeros(moe.num_experts, device=bias.device)
        full[routed] = bias
        moe.selector.set_load_bias(full)
        after = _imbalance(_loads(moe, token_scores, routed))
        results.append(LayerBalance(moe.layer_index, old, after))
    return results


def balance_load(
    model: nn.Module,
    blocks: Any = None,
    *,
    steps: int = DEFAULT_STEPS,
    rate: float = DEFAULT_RATE,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    tokens_per_layer: int = 2048,
    inputs: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
) -> BalanceReport:
    """Even out the experts' load with a per-expert score bias (DeepSeek-V3, no auxiliary loss).

    Args:
        model: a moefied model whose selectors choose top-k.
        blocks: calibration :class:`moefy.data.TokenBlocks` (or give ``inputs``).
        steps: bias updates per layer.
        rate: bias change per update, as a share of the layer's mean routed-expert score.
        batch_tokens: calibration tokens per update.
        tokens_per_layer: tokens sampled per layer from ``blocks``.
        inputs: the layers' sampled inputs from :func:`moefy.moe.budget.collect_layer_inputs`
            (then ``blocks`` is not read).
        seed: of the batches.

    Returns:
        A :class:`BalanceReport`; each balanced selector holds its bias (saved with the model).

    Raises:
        MoefyError: no MoE layers, bad settings, a selector whose rule is not top-k.

    Example:
        >>> report = balance_load(model, blocks, steps=200)
        >>> report.mean_imbalance  # (before, after): busiest expert's load / mean load
        (2.81, 1.28)
    """
    start = time.perf_counter()
    check_int("steps", steps, minimum=1)
    check_number("rate", rate, above=0.0)
    check_int("batch_tokens", batch_tokens, minimum=1)
    layers = _layers(model)
    for moe in layers:
        _check_balanceable(moe)
    sampled = _inputs(model, blocks, inputs, tokens_per_layer)
    gen = torch.Generator().manual_seed(seed)
    groups: dict[tuple, list[tuple[MoEFFN, torch.Tensor]]] = {}
    with torch.no_grad():
        for moe, x in zip(layers, sampled, strict=True):
            if moe.selector.selects_all():
                continue
            scores = torch.cat(
                [layer_scores(moe, x[s : s + _CHUNK]) for s in range(0, len(x), _CHUNK)]
            )  # (R, E)
            shape = (*scores.shape, getattr(moe, "num_shared", 0), moe.selector.num_selected())
            groups.setdefault(shape, []).append((moe, scores))
        results = [
            result
            for group in groups.values()
            for result in _balance_group(*zip(*group, strict=True), steps, rate, batch_tokens, gen)
        ]
    results.sort(key=lambda layer: layer.index)
    return BalanceReport(tuple(results), steps, float(rate), time.perf_counter() - start)


def _layer_union(
    mask: torch.Tensor, batch_sizes: Sequence[int], draws: int, gen: torch.Generator
) -> tuple[float, ...]:
    """(R, E) selections -> per batch size B, the mean share of experts M batches of B distinct
    random tokens read."""
    shares = []
    for size in batch_sizes:
        size = min(size, mask.shape[0])
        picks = torch.rand(draws, mask.shape[0], generator=gen).argsort(dim=-1)[:, :size]  # (M, B)
        read = mask[picks.to(mask.device)].any(dim=1)  # (M, E)
        shares.append(float(read.float().mean()))
    return tuple(shares)


def expert_union(
    model: nn.Module,
    blocks: Any = None,
    *,
    batch_sizes: Sequence[int] = DEFAULT_UNION_BATCHES,
    draws: int = DEFAULT_UNION_DRAWS,
    tokens_per_layer: int = 2048,
    inputs: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
) -> ExpertUnion:
    """Share of each layer's experts that a decode batch reads: B sequences, one token each.

    Each batch is B random calibration tokens; an expert is read when at least one of them
    selects it (by the layer's selector as it is set, load bias included).

    Args:
        model: a moefied model.
        blocks: calibration :class:`moefy.data.TokenBlocks` (or give ``inputs``).
        batch_sizes: the B to measure.
        draws: random batches per B.
        tokens_per_layer: tokens sampled per layer from ``blocks``.
        inputs: the layers' sampled inputs (see :func:`balance_load`).
        seed: of the draws.

    Returns:
        An :class:`ExpertUnion`.

    Example:
        >>> union = expert_union(model, blocks, batch_sizes=(1, 16))
        >>> union.mean  # B = 1 reads k / E; B = 16 more
        (0.25, 0.953)
    """
    if not batch_sizes or any(
        isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes
    ):
        raise MoefyError(f"batch sizes must be integers >= 1, got {list(batch_sizes)}")
    check_int("draws", draws, minimum=1)
    layers = _layers(model)
    sampled = _inputs(model, blocks, inputs, tokens_per_layer)
    gen = torch.Generator().manual_seed(seed)
    shares = []
    with torch.no_grad():
        for moe, x in zip(layers, sampled, strict=True):
            mask = torch.cat(
                [moe.selector(x[s : s + _CHUNK], moe) for s in range(0, len(x), _CHUNK)]
            )
            shares.append(_layer_union(mask, batch_sizes, draws, gen))
    return ExpertUnion(tuple(int(b) for b in batch_sizes), tuple(shares))
