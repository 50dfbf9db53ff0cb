"""Per-layer expert budgets: spend a global FFN FLOPs budget where each layer's experts matter.

Shape legend:
    B: blocks per batch, T: block length, N: tokens, D: model width, E: experts,
    S: slots per expert, R: sampled tokens per layer

:func:`allocate_experts` runs the model densely over calibration text once and keeps a bounded
uniform sample of every MoE layer's inputs (:func:`collect_layer_inputs`; the first positions of
each block, attention sinks whose FFN outputs dwarf the rest, are left out). Per layer it then
measures the output error of running only the k best experts (ranked by the layer's own
selector) for every k = 1..E, from the experts' outputs computed once (:func:`error_curve`),
relative to the residual stream after the layer, token by token: what the next layers see,
each through a norm. (Relative to the layer's own dense output instead, a layer whose output
sits in a few experts but is large against the stream looks cheap to cut; on SmolLM2 that
allocation is worse than one k everywhere.)
A greedy search starts from every expert everywhere and lowers k by one in the layer whose step
adds the least error per FLOP saved, until the FFN FLOPs per token (routers included, counted as
:meth:`moefy.moe.MoEFFN.flops_per_token` does) reach ``keep`` of the dense FFNs'. The per-layer
k are then set on the selectors: as top-k, or (``rule="dynamic"``) as a dynamic-k share ``tau``
per layer whose mean experts per token on the calibration tokens matches the allocated k.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.moe.convert import moe_layers
from moefy.moe.module import MoEFFN
from moefy.moe.selectors import DYNAMIC, TOPK, OracleSelector, RuleSelector
from moefy.validate import check_choice, check_int, is_finite

__all__ = [
    "BUDGET_RULES",
    "ERROR_MEASURES",
    "BudgetReport",
    "allocate_experts",
    "collect_layer_inputs",
    "error_curve",
    "layer_scores",
]

BUDGET_RULES = (TOPK, DYNAMIC)
RESIDUAL_ERROR, OUTPUT_ERROR = "residual", "output"
ERROR_MEASURES = (RESIDUAL_ERROR, OUTPUT_ERROR)
# Leading positions of each block left out (attention sinks, as StreamingLLM keeps 4).
DEFAULT_SINK_POSITIONS = 4
DEFAULT_TOKENS_PER_LAYER = 2048
DEFAULT_BATCH_SIZE = 8
# Tokens per chunk of the error curves: the (E, chunk, D) float32 expert outputs stay small.
_CURVE_CHUNK = 256
_TAU_BISECTION_STEPS = 30
_TINY = 1e-30  # floor of the norms errors are divided by


@dataclass(frozen=True)
class BudgetReport:
    """What :func:`allocate_experts` chose and measured.

    Attributes:
        keep: the budget, as a share of the dense FFN FLOPs.
        rule: ``topk`` or ``dynamic``.
        error: ``residual`` or ``output`` (see :func:`error_curve`).
        ks: experts per token allocated to each layer (shared experts included).
        errors: per layer, the error of the k best experts at k = 1..E (index k - 1) on the
            calibration tokens (see :func:`error_curve`).
        flops_share: FFN FLOPs per token (routers included) over the dense FFNs'; for
            ``dynamic`` from the mean experts per token measured on the calibration tokens.
        seconds: wall time of the allocation.
        taus: ``dynamic`` only: the per-layer share tau.
        mean_experts: ``dynamic`` only: measured mean experts per token per layer.

    Example:
        >>> report = allocate_experts(model, blocks, 0.5)  # SmolLM2-135M, 192 experts of 8
        >>> report.ks[:3], round(report.flops_share, 3)
        ((161, 104, 107), 0.5)
    """

    keep: float
    rule: str
    error: str
    ks: tuple[int, ...]
    errors: tuple[tuple[float, ...], ...]
    flops_share: float
    seconds: float
    taus: tuple[float, ...] | None = None
    mean_experts: tuple[float, ...] | None = None

    @property
    def layer_errors(self) -> tuple[float, ...]:
        """Each layer's relative output error at its allocated k (top-k ranking)."""
        return tuple(curve[k - 1] for curve, k in zip(self.errors, self.ks, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "keep": self.keep,
            "rule": self.rule,
            "error": self.error,
            "ks": list(self.ks),
            "errors": [list(curve) for curve in self.errors],
            "flops_share": self.flops_share,
            "seconds": self.seconds,
            "taus": None if self.taus is None else list(self.taus),
            "mean_experts": None if self.mean_experts is None else list(self.mean_experts),
        }


class _TokenSample:
    """A bounded uniform sample of tokens (reservoir by random keys: keep the R smallest), of
    one or more parallel per-token tensors."""

    def __init__(self, capacity: int, gen: torch.Generator) -> None:
        self.capacity, self.gen = capacity, gen
        self.columns: list[torch.Tensor] = []  # each (<= R, ...)
        self.keys = torch.empty(0)  # (<= R,) on the CPU

    def add(self, *columns: torch.Tensor) -> None:
        """Offer N tokens: tensors of the same leading size N (e.g. (N, D) inputs, (N,) norms)."""
        keys = torch.cat([self.keys, torch.rand(columns[0].shape[0], generator=self.gen)])
        if self.columns:
            columns = tuple(torch.cat(pair) for pair in zip(self.columns, columns, strict=True))
        if keys.shape[0] > self.capacity:
            kept = keys.topk(self.capacity, largest=False).indices.sort().values
            keys = keys[kept]
            columns = tuple(c[kept.to(c.device)] for c in columns)
        self.keys, self.columns = keys, list(columns)


def _past_sinks(x: torch.Tensor, sink_positions: int) -> torch.Tensor:
    """(B, T, D) or (N, D) -> (N', D) tokens without each block's first positions."""
    if x.dim() == 3 and x.shape[1] > sink_positions:
        x = x[:, sink_positions:]
    return x.detach().reshape(-1, x.shape[-1])


@contextlib.contextmanager
def _dense_hooks(
    model: nn.Module,
    layers: Sequence[MoEFFN],
    samples: Sequence[_TokenSample],
    sink_positions: int,
    residuals: bool,
) -> Iterator[None]:
    """Hooks that run every expert and feed each layer's inputs (sinks left out) to its sample,
    with the squared norms of the residual stream after the layer (its block's output) when
    ``residuals``."""
    inputs: dict[int, torch.Tensor] = {}

    def before(moe: MoEFFN, args: tuple, i: int) -> None:
        every = torch.ones(args[0].shape[:-1].numel(), moe.num_experts, dtype=torch.bool)
        moe.select_next(every.to(args[0].device))  # later layers see the dense model's inputs
        if residuals:
            inputs[i] = args[0]
        else:
            samples[i].add(_past_sinks(args[0], sink_positions))

    def after(output: Any, i: int) -> None:
        x, h = inputs.pop(i), output[0] if isinstance(output, tuple) else output
        if h.shape != x.shape:
            raise MoefyError(
                f"the block of MoE layer {layers[i].layer_index} outputs {tuple(h.shape)} for "
                f"inputs {tuple(x.shape)}; use error='output'"
            )
        h = _past_sinks(h, sink_positions)  # (N, D)
        samples[i].add(_past_sinks(x, sink_positions), h.float().square().sum(dim=-1))

    handles = [
        moe.register_forward_pre_hook(lambda m, a, i=i: before(m, a, i))
        for i, moe in enumerate(layers)
    ]
    if residuals:
        handles += [
            model.get_submodule(moe.block_name).register_forward_hook(
                lambda m, a, o, i=i: after(o, i)
            )
            for i, moe in enumerate(layers)
        ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _collect(
    model: nn.Module,
    blocks: Any,
    *,
    tokens_per_layer: int,
    sink_positions: int,
    residuals: bool,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = False,
) -> list[list[torch.Tensor]]:
    """Per MoE layer, the sampled ``[inputs (R, D)]`` or ``[inputs, residual norms (R,)]``."""
    from tqdm.auto import tqdm

    layers = _layers(model)
    check_int("tokens_per_layer", tokens_per_layer, minimum=1)
    check_int("sink_positions", sink_positions, minimum=0)
    gen = torch.Generator().manual_seed(seed)
    samples = [_TokenSample(tokens_per_layer, gen) for _ in layers]
    device = layers[0].w_in.device
    trunk = getattr(model, "base_model", model)  # no LM head: only the layers are needed
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _dense_hooks(model, layers, samples, sink_positions, residuals):
            batches = blocks.batches(batch_size)
            total = math.ceil(blocks.num_blocks / batch_size)
            for input_ids in tqdm(batches, total=total, desc="layer inputs", disable=not progress):
                trunk(input_ids=input_ids.to(device), use_cache=False)
    finally:
        model.train(was_training)
    if any(not sample.columns or sample.columns[0].shape[0] == 0 for sample in samples):
        raise MoefyError("no calibration tokens reached the MoE layers; give longer blocks")
    return [sample.columns for sample in samples]


def collect_layer_inputs(
    model: nn.Module,
    blocks: Any,
    *,
    tokens_per_layer: int = DEFAULT_TOKENS_PER_LAYER,
    sink_positions: int = DEFAULT_SINK_POSITIONS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Run ``model`` densely over ``blocks`` and sample every MoE layer's inputs.

    Args:
        model: a moefied model.
        blocks: calibration :class:`moefy.data.TokenBlocks`.
        tokens_per_layer: R, the most tokens kept per layer (a seeded uniform sample).
        sink_positions: leading positions of each block left out.
        batch_size: blocks per forward.
        seed: of the sample.
        progress: show a progress bar.

    Returns:
        One (R, D) tensor per MoE layer, in layer order, on the model's device.

    Example:
        >>> inputs = collect_layer_inputs(model, blocks, tokens_per_layer=512)
        >>> inputs[0].shape
        torch.Size([512, 576])
    """
    sampled = _collect(
        model,
        blocks,
        tokens_per_layer=tokens_per_layer,
        sink_positions=sink_positions,
        residuals=False,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    return [columns[0] for columns in sampled]


def _layers(model: nn.Module) -> list[MoEFFN]:
    layers = moe_layers(model)
    if not layers:
        raise MoefyError("the model has no MoE layers; call moefy_ first")
    return layers


def _expert_outputs(moe: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """(N, D) tokens -> (E, N, D) float32 output of every expert, expert-major (down bias
    left out)."""
    hidden = moe.expert_hidden(x).float()  # (N, E, S)
    return torch.bmm(hidden.transpose(0, 1), moe.w_out.float())  # (E, N, D)


def layer_scores(moe: MoEFFN, x: torch.Tensor, outputs: torch.Tensor | None = None) -> torch.Tensor:
    """(N, D) tokens -> (N, E) float32 scores of the layer's selector (the oracle's are the
    experts' true output norms, taken from ``outputs`` (E, N, D) when given)."""
    if isinstance(moe.selector, OracleSelector):
        outputs = _expert_outputs(moe, x) if outputs is None else outputs
        return torch.linalg.vector_norm(outputs, dim=-1).t()
    with torch.no_grad():
        return moe.selector.scores(x, moe).float()


def _ranking(moe: MoEFFN, scores: torch.Tensor) -> torch.Tensor:
    """(N, E) scores -> (N, E) expert ids in the order top-k takes them: shared experts first,
    then by score plus the selector's load bias (ties to the lower id, NaN first)."""
    bias = getattr(moe.selector, "load_bias", None)
    if bias is not None:
        scores = scores + bias.float()
    scores = scores.nan_to_num(nan=math.inf)
    shared = getattr(moe, "num_shared", 0)
    if shared:
        scores[:, :shared] = math.inf
    return scores.argsort(dim=-1, descending=True, stable=True)


def error_curve(
    moe: MoEFFN, x: torch.Tensor, residual_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """The layer's output error when its selector keeps the k best experts, for k = 1..E.

    With ``residual_norms``: the mean over tokens of ``||y_k - y||^2 / ||h||^2``, the error
    relative to the residual stream h after the layer (what the next layers see, each through
    a norm); without: ``sum ||y_k - y||^2 / sum ||y||^2``, relative to the layer's own dense
    output y. From each expert's output computed once and the selector's ranking taken once.

    Args:
        moe: the MoE layer.
        x: (N, D) its inputs.
        residual_norms: (N,) squared norms of the residual stream after the layer, or None.

    Returns:
        (E,) float64 errors; entry k - 1 is for k experts (the last is 0).

    Example:
        >>> curve = error_curve(moe, inputs[0])
        >>> bool(curve[-1] == 0)
        True
    """
    missing = torch.zeros(moe.num_experts, dtype=torch.float64, device=x.device)
    dense = torch.zeros((), dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for start in range(0, x.shape[0], _CURVE_CHUNK):
            chunk = x[start : start + _CURVE_CHUNK]
            outputs = _expert_outputs(moe, chunk)  # (E, n, D)
            n = chunk.shape[0]
            order = _ranking(moe, layer_scores(moe, chunk, outputs))  # (n, E)
            rows = order * n + torch.arange(n, device=x.device)[:, None]  # (n, E) in (E*n)
            ordered = outputs.view(-1, moe.d_model).index_select(0, rows.flatten())
            ordered = ordered.view(n, moe.num_experts, moe.d_model)  # each token's best first
            del outputs
            ordered.cumsum_(dim=1)  # (n, E, D): output of the k best, k = 1..E
            total = ordered[:, -1:].clone()  # (n, 1, D)
            ordered.sub_(total)  # minus what every expert gives: what the k best miss
            error = torch.linalg.vector_norm(ordered, dim=-1).square()  # (n, E)
            if residual_norms is not None:
                error /= residual_norms[start : start + _CURVE_CHUNK, None].clamp_min(_TINY)
            missing += error.sum(dim=0).double()
            if moe.b_out is not None:
                total += moe.b_out.float()
            dense += total.square().sum().double()
    if residual_norms is not None:
        return missing / x.shape[0]
    return missing / dense.clamp_min(_TINY)


@dataclass(frozen=True)
class _LayerCost:
    """FLOPs per token of one layer: ``base + step * k`` for k experts, and its dense FFN's."""

    base: float
    step: float
    dense: float
    floor: int  # the fewest experts it may run

    def flops(self, k: float) -> float:
        return self.base + self.step * k


def _layer_costs(layers: Sequence[MoEFFN]) -> list[_LayerCost]:
    costs = []
    for moe in layers:
        base = moe.flops_per_token(experts_per_token=0.0)  # router and output bias
        step = moe.flops_per_token(experts_per_token=1.0) - base
        floor = max(1, int(getattr(moe, "num_shared", 0)))
        costs.append(_LayerCost(base, step, moe.dense_flops_per_token(), floor))
    return costs


def _check_keep(keep: Any, costs: Sequence[_LayerCost]) -> None:
    if not is_finite(keep) or not 0.0 < keep <= 1.0:
        raise MoefyError(f"keep={keep!r} must be a share of the dense FFN FLOPs in (0, 1]")
    dense = sum(c.dense for c in costs)
    least = sum(c.flops(c.floor) for c in costs) / dense
    if keep < least:
        raise MoefyError(
            f"keep={keep:g} is below the least these layers can run ({least:.4f} of the dense "
            "FFN FLOPs: their fewest experts plus the routers); raise keep"
        )


def _greedy(curves: Sequence[Sequence[float]], costs: Sequence[_LayerCost], budget: float):
    """Per-layer k: from every expert, drop the cheapest error-per-FLOP step until the FLOPs
    per token are at most ``budget``."""
    ks = [len(curve) for curve in curves]
    total = sum(c.flops(k) for c, k in zip(costs, ks, strict=True))

    def step_price(i: int) -> float:  # error added per FLOP saved by going from k to k - 1
        return (curves[i][ks[i] - 2] - curves[i][ks[i] - 1]) / max(costs[i].step, 1e-30)

    heap = [(step_price(i), i) for i in range(len(ks)) if ks[i] > costs[i].floor]
    heapq.heapify(heap)
    while total > budget and heap:
        _, i = heapq.heappop(heap)
        ks[i] -= 1
        total -= costs[i].step
        if ks[i] > costs[i].floor:
            heapq.heappush(heap, (step_price(i), i))
    return ks


def _mean_experts(selector: RuleSelector, scores: torch.Tensor, tau: float) -> float:
    selector.set_rule(DYNAMIC, tau)
    return float(selector.mask_from_scores(scores).sum(dim=-1).float().mean())


def _fit_tau(moe: MoEFFN, x: torch.Tensor, k: int) -> tuple[float, float]:
    """The largest dynamic-k share tau whose mean experts per token on ``x`` is at most k
    (the smallest tau tried when none is), and that mean."""
    selector = moe.selector
    if not isinstance(selector, RuleSelector):
        raise MoefyError(
            f"layer {moe.layer_index} has a {selector.selector_type!r} selector; rule='dynamic' "
            "needs the oracle or a router"
        )
    scores = torch.cat(
        [layer_scores(moe, x[s : s + _CURVE_CHUNK]) for s in range(0, len(x), _CURVE_CHUNK)]
    )  # (N, E)
    if _mean_experts(selector, scores, 1.0) <= k:
        return 1.0, _mean_experts(selector, scores, 1.0)
    low, high = 0.0, 1.0
    for _ in range(_TAU_BISECTION_STEPS):
        middle = (low + high) / 2
        if _mean_experts(selector, scores, middle) <= k:
            low = middle
        else:
            high = middle
    tau = low if low > 0 else high
    return tau, _mean_experts(selector, scores, tau)


def _set_topk(moe: MoEFFN, k: int) -> None:
    if isinstance(moe.selector, RuleSelector):
        moe.selector.set_rule(TOPK)
    moe.selector.set_topk(k=k)


def _restore(layers: Sequence[MoEFFN], saved: Sequence[dict[str, Any]]) -> None:
    for moe, old in zip(layers, saved, strict=True):
        moe.selector.set_topk(k=old.get("k"), fraction=old.get("fraction"))
        if isinstance(moe.selector, RuleSelector):
            moe.selector.set_rule(old.get("rule", TOPK), old.get("tau"))


def _allocate(
    layers: Sequence[MoEFFN],
    costs: Sequence[_LayerCost],
    sampled: Sequence[Sequence[torch.Tensor]] | None,
    keep: float,
    rule: str,
    curves: list[list[float]] | None = None,
) -> tuple[list[list[float]], list[int], tuple | None, tuple | None]:
    """Error curves (measured on ``sampled`` unless given), per-layer k, and (dynamic) taus
    and mean experts; sets the selectors."""
    if curves is None:
        assert sampled is not None
        curves = [
            error_curve(moe, *columns).tolist()
            for moe, columns in zip(layers, sampled, strict=True)
        ]
    dense = sum(c.dense for c in costs)
    ks = [len(c) for c in curves] if keep >= 1.0 else _greedy(curves, costs, keep * dense)
    if rule != DYNAMIC:
        for moe, k in zip(layers, ks, strict=True):
            _set_topk(moe, k)
        return curves, ks, None, None
    fitted = [_fit_tau(moe, cols[0], k) for moe, cols, k in zip(layers, sampled, ks, strict=True)]
    taus, means = (tuple(v) for v in zip(*fitted, strict=True))
    return curves, ks, taus, means


def _given_curves(
    curves: Sequence[Sequence[float]] | None, layers: Sequence[MoEFFN]
) -> list[list[float]] | None:
    """``curves`` as lists after checking they fit ``layers`` (one value per k = 1..E)."""
    if curves is None:
        return None
    if len(curves) != len(layers) or any(
        len(curve) != moe.num_experts for curve, moe in zip(curves, layers, strict=False)
    ):
        raise MoefyError(
            "curves= do not fit this model: give the errors of a report on the same moefied model"
        )
    return [[float(v) for v in curve] for curve in curves]


def allocate_experts(
    model: nn.Module,
    blocks: Any,
    keep: float,
    *,
    rule: str = TOPK,
    error: str = RESIDUAL_ERROR,
    progress: bool = False,
    tokens_per_layer: int = DEFAULT_TOKENS_PER_LAYER,
    sink_positions: int = DEFAULT_SINK_POSITIONS,
    curves: Sequence[Sequence[float]] | None = None,
) -> BudgetReport:
    """Give each MoE layer its own number of experts so the FFNs spend ``keep`` of dense FLOPs.

    Args:
        model: a moefied model (any selector: the oracle or routers).
        blocks: calibration :class:`moefy.data.TokenBlocks`.
        keep: share of the dense FFN FLOPs per token to spend, in (0, 1], routers included;
            1.0 keeps every expert.
        rule: ``topk`` (k experts per token in each layer) or ``dynamic`` (per layer a share
            tau whose mean experts per token on the calibration tokens is the allocated k).
        error: what a layer's error is relative to: ``residual`` (default), the residual
            stream after the layer, per token; ``output``, the layer's own dense output (it
            starves layers whose output sits in a few experts but is large against the
            stream: worse perplexity than one k everywhere on SmolLM2).
        progress: show a progress bar while collecting.
        tokens_per_layer: calibration tokens sampled per layer.
        sink_positions: leading positions of each block left out of the errors.
        curves: the error curves of an earlier report on the same model and selectors
            (``report.errors``): with the ``topk`` rule no calibration pass runs, so one
            measurement serves every budget.

    Returns:
        A :class:`BudgetReport`; the selectors are set (in place).

    Raises:
        MoefyError: no MoE layers, keep outside (0, 1] or below one expert per layer, an
            unknown rule or error, ``dynamic`` on a selector without rules.

    Example:
        >>> report = allocate_experts(model, calibration_blocks, 0.25)
        >>> report.flops_share <= 0.25
        True
    """
    start = time.perf_counter()
    check_choice("rule", rule, BUDGET_RULES)
    check_choice("error", error, ERROR_MEASURES)
    layers = _layers(model)
    costs = _layer_costs(layers)
    _check_keep(keep, costs)
    saved = [moe.selector.to_dict() for moe in layers]
    given = _given_curves(curves, layers) if rule == TOPK else None
    sampled = None
    if given is None:
        sampled = _collect(
            model,
            blocks,
            tokens_per_layer=tokens_per_layer,
            sink_positions=sink_positions,
            residuals=error == RESIDUAL_ERROR,
            progress=progress,
        )
    try:
        curves, ks, taus, means = _allocate(layers, costs, sampled, keep, rule, given)
    except BaseException:
        _restore(layers, saved)
        raise
    dense = sum(c.dense for c in costs)
    spent = sum(c.flops(k) for c, k in zip(costs, means or ks, strict=True))
    return BudgetReport(
        keep=float(keep),
        rule=rule,
        error=error,
        ks=tuple(ks),
        errors=tuple(tuple(curve) for curve in curves),
        flops_share=spent / dense,
        seconds=time.perf_counter() - start,
        taus=taus,
        mean_experts=means,
    )
