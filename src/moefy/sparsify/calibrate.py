"""Calibration: stream text through the model, accumulate fixed-size statistics, pick thresholds.

Everything here runs unchanged under ``torchrun``: each rank reads ``data.shard(rank, world)``,
statistics are sums (histogram counts, per-channel sums) that are all-reduced, and decisions are
taken on the reduced sums, so every rank reaches what one process would.

Memory is bounded by the model, not by the text: per wrapper a histogram of ``NUM_BINS`` float64
counts and at most one (C,) vector. Only the greedy allocation keeps activations, and only the
inputs of each block on the first ``greedy_tokens`` tokens.

Shape legend:
    B: batch of blocks, T: block length, D: model width, C: channels of a sparsified tensor,
    H: histogram bins, S: greedy steps, W: wrappers of one block
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.dist import all_reduce_sum_, rank_and_world
from moefy.errors import MoefyError
from moefy.sparsify.histogram import add_to_histogram_, empty_histogram, histogram_quantile
from moefy.sparsify.wrappers import SparseModule, counters_paused


class _StopForwardError(Exception):
    """Raised by a hook to end a forward pass once the last module of interest has run."""


@contextlib.contextmanager
def stop_after(module: nn.Module | None) -> Iterator[None]:
    """Inside the block, a forward pass ends (silently) right after ``module`` has run.

    Calibration needs nothing past the last sparsified block, so the LM head (a fifth of
    SmolLM2's compute) is skipped.
    """
    if module is None:
        yield
        return

    def _raise(_module: nn.Module, _args: object, _out: object) -> None:
        raise _StopForwardError

    handle = module.register_forward_hook(_raise)
    try:
        yield
    finally:
        handle.remove()


def run_model(model: nn.Module, input_ids: torch.Tensor) -> None:
    """One forward pass on (B, T) token ids (decoder ids = input ids for encoder-decoders)."""
    config = getattr(model, "config", None)
    kwargs: dict[str, object] = {"input_ids": input_ids}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = input_ids
    if getattr(config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    with contextlib.suppress(_StopForwardError):  # raised by stop_after once it has what it needs
        model(**kwargs)


def stream_ffns(
    model: nn.Module, data: TokenBlocks, batch_size: int, *, desc: str, progress: bool
) -> None:
    """:func:`stream` up to the block of the model's last FFN (the LM head is not needed when
    the statistics come from FFN or attention hooks)."""
    from moefy.arch import find_ffns

    last = find_ffns(model)[-1].block
    stream(model, data, batch_size, last_module=last, desc=desc, progress=progress)


def stream(
    model: nn.Module,
    data: TokenBlocks,
    batch_size: int,
    *,
    last_module: nn.Module | None,
    desc: str,
    progress: bool,
) -> None:
    """Run this rank's shard of ``data`` through ``model`` (statistics come from hooks)."""
    from tqdm.auto import tqdm

    rank, world = rank_and_world()
    shard = data.shard(rank, world)
    device = device_of(model)
    batches = tqdm(
        shard.batches(batch_size) if shard.num_blocks else iter(()),
        total=math.ceil(shard.num_blocks / batch_size),
        desc=desc,
        unit="batch",
        disable=not progress or rank != 0,
        leave=False,
    )
    with torch.no_grad(), stop_after(last_module):
        for input_ids in batches:
            run_model(model, input_ids.to(device))  # (B, T)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def observing(
    wrappers: Sequence[SparseModule], callbacks: Sequence[Callable[[torch.Tensor], None]]
) -> Iterator[None]:
    """Hook ``callbacks[i]`` to the tensor ``wrappers[i]`` sparsifies; removed on exit."""
    handles = [
        wrapper.observe(callback) for wrapper, callback in zip(wrappers, callbacks, strict=True)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _score(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The criterion of each entry: |v| (C,)-scaled when the method weighs channels."""
    magnitude = values.detach().abs().float()  # (..., C)
    return magnitude if scale is None else magnitude * scale


def collect_histograms(
    model: nn.Module,
    wrappers: Sequence[SparseModule],
    scales: Sequence[torch.Tensor | None],
    data: TokenBlocks,
    batch_size: int,
    *,
    last_module: nn.Module | None,
    progress: bool,
) -> list[torch.Tensor]:
    """(H,) histogram of each wrapper's criterion on ``data``, summed over ranks.

    The wrappers should hold zero thresholds (a dense model): calibration reads the dense
    model's activations, as TEAL does.
    """
    device = device_of(model)
    histograms = [empty_histogram(device) for _ in wrappers]
    scales = [None if s is None else s.to(device) for s in scales]

    # wrappers reading one tensor with one scale (gate and up, q, k and v) count it once
    last: list = [None, None, None]  # [values, scale, (H,) counts]

    def _callback(i: int) -> Callable[[torch.Tensor], None]:
        def _add(values: torch.Tensor) -> None:
            if last[0] is not values or last[1] is not scales[i]:
                last[:] = (
                    values,
                    scales[i],
                    add_to_histogram_(empty_histogram(device), _score(values, scales[i])),
                )
            histograms[i] += last[2]

        return _add

    callbacks = [_callback(i) for i in range(len(wrappers))]
    with observing(wrappers, callbacks):
        stream(
            model, data, batch_size, last_module=last_module, desc="calibrating", progress=progress
        )
    last.clear()
    stacked = all_reduce_sum_(torch.stack(histograms))  # (W, H)
    return list(stacked.unbind(0))


def thresholds_for(
    histogram: torch.Tensor, scale: torch.Tensor | None, share: float
) -> tuple[float, torch.Tensor]:
    """Criterion threshold ``t`` zeroing ``share`` of the scores, and the stored threshold.

    The stored threshold is ``t`` itself, or ``t / scale`` per channel (a zero-scale channel
    never contributes and is always dropped).
    """
    criterion = histogram_quantile(histogram, share)
    if scale is None:
        return criterion, torch.tensor(criterion, dtype=torch.float32)
    if criterion == 0.0:
        return criterion, torch.zeros_like(scale, dtype=torch.float32)
    per_channel = torch.where(
        scale > 0, criterion / scale.clamp_min(torch.finfo(torch.float32).tiny), torch.inf
    )
    return criterion, per_channel.float()


# ---------------------------------------------------------------------------------------------
# TEAL's greedy allocation inside each block


@dataclass
class BlockPlan:
    """The wrappers of one transformer block and the module whose output the search measures.

    Attributes:
        layer: block (FFN site) index.
        unit: the smallest module holding all the block's wrappers (the FFN, or the block).
        wrappers: the block's threshold wrappers.
        indices: their positions in the model-wide wrapper list.
        block: the transformer block, whose output is the residual stream the search's error is
            made relative to (``relative=True`` in :func:`greedy_trajectories`).
        captured: the unit's inputs on the sample, per batch (filled during the search).
        token_weights: per batch, (B, T) ``1 / ||h||^2`` of the dense residual stream h after
            the block (filled during a relative search).
    """

    layer: int
    unit: nn.Module
    wrappers: list[SparseModule]
    indices: list[int]
    block: nn.Module | None = None
    captured: list[tuple[tuple, dict]] = field(default_factory=list)
    token_weights: list[torch.Tensor] = field(default_factory=list)


# floor of the squared residual norms a relative error is divided by
_TINY_NORM = 1e-30


@contextlib.contextmanager
def _capturing(plans: Sequence[BlockPlan], relative: bool) -> Iterator[None]:
    def _hook(plan: BlockPlan) -> Callable:
        def _capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            plan.captured.append((args, kwargs))

        return _capture

    def _residual_hook(plan: BlockPlan) -> Callable:
        def _capture(_module: nn.Module, _args: tuple, output: object) -> None:
            h = _first_tensor(output).detach().double()  # (B, T, D)
            plan.token_weights.append(1.0 / h.square().sum(dim=-1).clamp_min(_TINY_NORM))

        return _capture

    handles = [p.unit.register_forward_pre_hook(_hook(p), with_kwargs=True) for p in plans]
    if relative:
        handles += [p.block.register_forward_hook(_residual_hook(p)) for p in plans]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first_tensor(output: object) -> torch.Tensor:
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor) and hasattr(output, "to_tuple"):
        return _first_tensor(output.to_tuple())
    return output  # type: ignore[return-value]


def _replay(plan: BlockPlan) -> list[torch.Tensor]:
    with torch.no_grad(), counters_paused():
        return [_first_tensor(plan.unit(*args, **kwargs)) for args, kwargs in plan.captured]


def output_error(
    outputs: Sequence[torch.Tensor],
    dense: Sequence[torch.Tensor],
    sink_positions: int,
    token_weights: Sequence[torch.Tensor] | None = None,
) -> float:
    """Summed squared error of a unit's outputs against the dense ones, leaving out the first
    ``sink_positions`` positions of each (B, T, D) output (all positions of shorter blocks and of
    outputs without a sequence axis count).

    Args:
        outputs, dense: per batch, the unit's (B, T, D) outputs and the dense ones.
        sink_positions: leading positions left out.
        token_weights: per batch, (B, T) weights of each token's squared error (None: 1).

    Example:
        >>> output_error([torch.ones(1, 8, 4)], [torch.zeros(1, 8, 4)], sink_positions=4)
        16.0
    """
    total = 0.0
    weights = [None] * len(outputs) if token_weights is None else token_weights
    for out, ref, weight in zip(outputs, dense, weights, strict=True):
        skip = sink_positions if out.dim() >= 3 and out.shape[1] > sink_positions else 0
        squared = (out[:, skip:] - ref[:, skip:]).double().square()
        if weight is None:
            total += float(squared.sum())
            continue
        if weight.shape != out.shape[:-1]:
            raise MoefyError(
                f"a unit's output {tuple(out.shape)} has no (B, T) token axes matching its "
                f"block's output {tuple(weight.shape)}: use budget='block' for this model"
            )
        total += float((squared.sum(dim=-1) * weight[:, skip:].to(squared.device)).sum())
    return total


def effective_sparsity(shares: torch.Tensor, weights: torch.Tensor) -> float:
    """Weight-weighted mean of per-wrapper shares: the share of the block's weights skipped."""
    return float((shares * weights).sum() / weights.sum())


def greedy_trajectories(
    model: nn.Module,
    plans: Sequence[BlockPlan],
    histograms: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor | None],
    sample: TokenBlocks,
    batch_size: int,
    *,
    target: float,
    step: float,
    sink_positions: int = 0,
    relative: bool = False,
    progress: bool,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """TEAL's block-wise greedy search, recorded step by step.

    For each block, all its wrappers start dense. Each step tries adding ``step`` to the
    sparsity of every wrapper in turn, measures the block's output error against the dense block
    on the sample, and keeps the trial with the least added error per skipped weight. It stops
    when the block skips ``target`` of its weights (the last step is cut to land on it).

    Args:
        model: the model with threshold wrappers (zero thresholds on entry and on exit).
        plans: one per block.
        histograms, scales: per model-wide wrapper index, as from :func:`collect_histograms`.
        sample: the calibration blocks the error is measured on (sharded over ranks here).
        batch_size: blocks per forward pass.
        target: share of each block's weights to skip.
        step: sparsity added to one wrapper per step.
        sink_positions: leading positions of each block left out of the error (attention
            sinks: see :class:`moefy.sparsify.config.LayerwiseConfig`).
        relative: weigh each token's squared error by ``1 / ||h||^2``, h the dense residual
            stream after the block (``plan.block``'s output): errors comparable across blocks,
            as the next block sees h through a norm.
        progress: show a progress bar.

    Returns:
        ``({layer: (S + 1, W) shares}, {layer: (S + 1,) errors})``: row 0 is dense, the last
        row reaches ``target``; each error is the block's (summed over ranks) at its row.
    """
    from tqdm.auto import tqdm

    rank, world = rank_and_world()
    last = plans[-1].block if relative else plans[-1].unit
    with _capturing(plans, relative):
        stream(model, sample, batch_size, last_module=last, desc="greedy sample", progress=False)
    trajectories: dict[int, torch.Tensor] = {}
    errors: dict[int, torch.Tensor] = {}
    try:
        for plan in tqdm(
            plans, desc="greedy allocation", unit="block", disable=not progress or rank != 0
        ):
            with _memoised(plan.wrappers, max_inputs=len(plan.captured)):
                trajectories[plan.layer], errors[plan.layer] = _greedy_block(
                    plan, histograms, scales, target, step, sink_positions
                )
    finally:
        for plan in plans:
            plan.captured.clear()
            plan.token_weights.clear()
            for wrapper in plan.wrappers:
                wrapper.threshold.zero_()
    return trajectories, errors


# Outputs a memoised wrapper keeps per input: the greedy's current thresholds and one trial.
_MEMO_PER_INPUT = 2
# Entries of an input a memoised wrapper samples to look it up (then compared whole).
_MEMO_SAMPLES = 64


def _input_key(x: torch.Tensor) -> tuple:
    """A cheap lookup key of a tensor's values: shape, dtype and a strided sample of entries.

    Equal tensors get equal keys; unequal ones usually differ, and :func:`torch.equal` settles
    the rest.
    """
    flat = x.detach().reshape(-1)
    stride = max(1, flat.numel() // _MEMO_SAMPLES)
    return (tuple(x.shape), x.dtype, x.device, tuple(flat[::stride].tolist()))


def _same_input(entry: tuple, x: torch.Tensor) -> bool:
    """Whether a memo entry's input, unchanged since it was stored, equals ``x``."""
    stored, version = entry[0], entry[1]
    return stored._version == version and (stored is x or torch.equal(stored, x))


@contextlib.contextmanager
def _memoised(wrappers: Sequence[SparseModule], max_inputs: int) -> Iterator[None]:
    """Inside: a wrapper called again on an input equal to an earlier one (the same values),
    with its buffers (the thresholds) equal to one of the last two calls on it, returns that
    call's output instead of recomputing it.

    The greedy search replays a block once per trial with one wrapper changed: the wrappers
    upstream of it (gate and up when down is tried; with ``attention``, every projection before
    the tried one, whose inputs the replay recomputes to the same values) see inputs equal to
    the current step's with the current thresholds, so their outputs are reused. Two outputs per
    input (the current thresholds and the wrapper's own last trial, which becomes the current
    one when the step picks it) keep every such reuse a hit. Inputs are looked up by
    :func:`_input_key`, then confirmed by identity or :func:`torch.equal` (a pass over the
    input, far cheaper than the product it saves). Each wrapper keeps the outputs of its last
    ``max_inputs`` inputs (one per captured batch), an output that was changed in place is
    never reused, and the plain ``forward`` is back on exit.
    """

    def _patch(wrapper: SparseModule) -> None:
        plain = wrapper.forward
        # input key -> [(input, its version, buffers, output, its version)], most recent last
        memo: dict[tuple, list[tuple]] = {}

        def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            if args or kwargs or not isinstance(x, torch.Tensor):
                return plain(x, *args, **kwargs)
            buffers = list(wrapper.buffers())
            key = _input_key(x)
            entries = memo.get(key, [])
            if entries and not _same_input(entries[0], x):
                entries = []  # another input with the same sample, or changed in place
            for i, entry in enumerate(entries):
                if entry[4] == entry[3]._version and all(
                    torch.equal(a, b) for a, b in zip(entry[2], buffers, strict=True)
                ):
                    entries.append(entries.pop(i))  # the most recent now
                    return entry[3]
            out = plain(x)
            entries = entries[-(_MEMO_PER_INPUT - 1) :] if _MEMO_PER_INPUT > 1 else []
            entries.append((x, x._version, [b.clone() for b in buffers], out, out._version))
            memo.pop(key, None)
            while len(memo) >= max(max_inputs, 1):
                memo.pop(next(iter(memo)))  # the oldest input
            memo[key] = entries
            return out

        wrapper.forward = forward  # an instance attribute: nn.Module's __call__ finds it first

    for wrapper in wrappers:
        _patch(wrapper)
    try:
        yield
    finally:
        for wrapper in wrappers:
            del wrapper.forward


def _greedy_block(
    plan: BlockPlan,
    histograms: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor | None],
    target: float,
    step: float,
    sink_positions: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    weights = torch.tensor([w.scope_weights for w in plan.wrappers], dtype=torch.float64)  # (W,)
    token_weights = plan.token_weights or None

    def _set(j: int, share: float) -> None:
        i = plan.indices[j]
        plan.wrappers[j].threshold.copy_(thresholds_for(histograms[i], scales[i], share)[1])

    def _error() -> float:
        return output_error(_replay(plan), dense, sink_positions, token_weights)

    for j in range(len(plan.wrappers)):
        _set(j, 0.0)
    dense = _replay(plan)
    shares = torch.zeros(len(plan.wrappers), dtype=torch.float64)  # (W,)
    rows, row_errors = [shares.clone()], [0.0]
    current_error = 0.0
    while effective_sparsity(shares, weights) < target - 1e-12:
        increments = (1.0 - shares).clamp(max=step)  # (W,)
        errors = torch.full((len(plan.wrappers),), math.inf, dtype=torch.float64)
        for j in range(len(plan.wrappers)):
            if increments[j] <= 0:
                continue
            _set(j, float(shares[j] + increments[j]))
            errors[j] = _error()
            _set(j, float(shares[j]))
        finite = torch.isfinite(errors)
        errors = all_reduce_sum_(torch.where(finite, errors, 0.0)).masked_fill(~finite, math.inf)
        cost = (errors - current_error) / (increments * weights)  # error added per skipped weight
        best = int(torch.argmin(cost))
        gap = (target - effective_sparsity(shares, weights)) * float(weights.sum() / weights[best])
        cut = gap < float(increments[best])
        shares[best] += min(float(increments[best]), gap)
        _set(best, float(shares[best]))
        # a cut step lands between trials: measure its error (summed over ranks) once more
        current_error = _reduced(_error()) if cut else float(errors[best])
        rows.append(shares.clone())
        row_errors.append(current_error)
    return torch.stack(rows), torch.tensor(row_errors, dtype=torch.float64)  # (S + 1, W), (S + 1,)


def _reduced(value: float) -> float:
    return float(all_reduce_sum_(torch.tensor([value], dtype=torch.float64))[0])


def shares_at(trajectory: torch.Tensor, weights: torch.Tensor, target: float) -> torch.Tensor:
    """Per-wrapper shares where a recorded trajectory reaches ``target`` (interpolating the step).

    Args:
        trajectory: (S + 1, W) rows from :func:`greedy_trajectories`.
        weights: (W,) scope weights of the wrappers.
        target: at most the trajectory's last effective sparsity.
    """
    weights = weights.to(torch.float64)
    effective = (trajectory * weights).sum(dim=1) / weights.sum()  # (S + 1,)
    reached = torch.nonzero(effective >= target - 1e-12)
    if len(reached) == 0:
        raise ValueError("target beyond the recorded trajectory")
    row = int(reached[0])
    if row == 0:
        return trajectory[0].clone()
    before, after = trajectory[row - 1], trajectory[row]
    span = float(effective[row] - effective[row - 1])
    fraction = (target - float(effective[row - 1])) / span if span > 0 else 1.0
    return before + (after - before) * fraction
