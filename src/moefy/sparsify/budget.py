"""Budgets of the layerwise methods: how a target share of skipped weights is spread over the
sparsified projections of every block (``LayerwiseConfig.budget``).

* ``block``: each block skips the target share of its weights; inside a block TEAL's greedy
  trajectory (:func:`moefy.sparsify.calibrate.greedy_trajectories`) or one share for all.
* ``global``: one budget over every block. Each block's greedy trajectory is recorded to full
  sparsity with its error relative to the residual stream after the block, token by token (what
  the next block sees through its norm), so errors of different blocks compare; then, as
  :mod:`moefy.moe.budget` does for experts, blocks advance along their trajectories where the
  least error is added per skipped weight (on the lower convex hull of each curve) until the
  budget is spent. A lower target is read off the same curves, without a search.
* ``tail``: ActTail's prior, no search: each projection's heavy-tail exponent alpha (a Hill fit
  to the largest eigenvalues of ``W^T W``) places its share in ``target +- TAIL_SPREAD``; a
  heavier tail (smaller alpha: more learned structure) skips less.

Every rule pays for the wrappers' ``overhead_weights`` (multiply-adds a wrapper spends beyond
its base layer's kept columns): the weights skipped must be the target share plus the overhead,
so that the net share skipped is the target.

Shape legend:
    S: greedy steps, W: wrappers of one block, N: wrappers of the model, K: singular values
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moefy.errors import MoefyError
from moefy.sparsify.calibrate import BlockPlan, shares_at
from moefy.sparsify.wrappers import SparseModule

# The tail rule's shares lie in target +- TAIL_SPREAD before they are shifted onto the budget
# (AlphaPruning's epsilon; ActTail maps its exponents into such a band too).
TAIL_SPREAD = 0.2
# Share of the eigenvalues (the largest) the heavy-tail exponent is fitted to.
TAIL_FIT_SHARE = 0.5
_BISECTION_STEPS = 60
_EPS = 1e-12


def skipped_weights_needed(
    wrappers: Sequence[SparseModule], sparsity: float, where: str = "the model"
) -> float:
    """Weight reads per token the ``wrappers`` must skip so that, after paying for their
    ``overhead_weights``, they skip ``sparsity`` of their dense weights.

    Raises:
        MoefyError: the overhead cannot be paid for (more than every weight would be skipped).

    Example:
        >>> skipped_weights_needed(wrappers, 0.5)  # no overhead: half their scope weights
        73728.0
    """
    dense = float(sum(w.scope_weights for w in wrappers))
    overhead = float(sum(getattr(w, "overhead_weights", 0) for w in wrappers))
    needed = sparsity * dense + overhead
    if needed > dense * (1.0 + _EPS):
        raise MoefyError(
            f"rank too high for this sparsity: paying the {overhead:.0f} multiply-adds of "
            f"overhead of {where} needs {needed / dense:.3f} of its weights skipped; lower the "
            "rank or the overhead, or raise the sparsity"
        )
    return min(needed, dense)


def block_targets(plans: Sequence[BlockPlan], sparsity: float) -> list[float]:
    """Per block, the share of its weights to skip so its net share skipped is ``sparsity``.

    Example:
        >>> block_targets(plans, 0.5)  # wrappers without overhead
        [0.5, 0.5]
    """
    return [
        skipped_weights_needed(p.wrappers, sparsity, f"block {p.layer}") / _dense(p) for p in plans
    ]


def _dense(plan: BlockPlan) -> float:
    return float(sum(w.scope_weights for w in plan.wrappers))


def _scope(plan: BlockPlan) -> torch.Tensor:
    return torch.tensor([w.scope_weights for w in plan.wrappers], dtype=torch.float64)  # (W,)


def _spread(plans: Sequence[BlockPlan], n_wrappers: int, per_block) -> list[float]:
    shares = [0.0] * n_wrappers
    for plan in plans:
        for index, share in zip(plan.indices, per_block(plan), strict=True):
            shares[index] = float(share)
    return shares


def uniform_shares(plans: Sequence[BlockPlan], n_wrappers: int, sparsity: float) -> list[float]:
    """``block`` without the greedy search: every wrapper of a block at its block's target."""
    targets = dict(zip((p.layer for p in plans), block_targets(plans, sparsity), strict=True))
    return _spread(plans, n_wrappers, lambda p: [targets[p.layer]] * len(p.wrappers))


def block_shares(
    plans: Sequence[BlockPlan],
    n_wrappers: int,
    trajectories: dict[int, torch.Tensor],
    sparsity: float,
) -> list[float]:
    """``block``: each block's shares where its greedy trajectory reaches its target."""
    targets = dict(zip((p.layer for p in plans), block_targets(plans, sparsity), strict=True))
    return _spread(
        plans,
        n_wrappers,
        lambda p: shares_at(trajectories[p.layer], _scope(p), targets[p.layer]).tolist(),
    )


@dataclass(order=True)
class _Move:
    """Advancing one block from its current row to ``row``: ``price`` error per skipped weight."""

    price: float
    layer: int
    row: int


def _cheapest_move(layer: int, skipped: torch.Tensor, errors: torch.Tensor, row: int):
    """The move along the lower convex hull of (skipped, error) from ``row``, or None at the end."""
    if row + 1 >= len(skipped):
        return None
    gained = (skipped[row + 1 :] - skipped[row]).clamp_min(_EPS)  # (S - row,)
    prices = (errors[row + 1 :] - errors[row]) / gained
    best = int(torch.argmin(prices))
    return _Move(float(prices[best]), layer, row + 1 + best)


def global_block_sparsities(
    skipped: dict[int, torch.Tensor], errors: dict[int, torch.Tensor], budget: float
) -> dict[int, float]:
    """Water-filling: the weights each block skips so that together they skip ``budget``.

    Every block starts dense; the move adding the least error per skipped weight (along each
    block's lower convex hull) is taken until the budget is reached, the last one cut to land
    on it. The same curves give every lower budget: its moves are a prefix of these.

    Args:
        skipped: per block, (S + 1,) weights skipped at each trajectory row (row 0: none).
        errors: per block, (S + 1,) errors at the rows (comparable across blocks).
        budget: weights to skip in total, at most the sum of the last rows.

    Returns:
        Weights skipped per block.

    Example:
        >>> global_block_sparsities({0: torch.tensor([0., 2.]), 1: torch.tensor([0., 2.])},
        ...                         {0: torch.tensor([0., 1.]), 1: torch.tensor([0., 9.])}, 2.0)
        {0: 2.0, 1: 0.0}
    """
    spent = {layer: 0.0 for layer in skipped}
    total = 0.0
    heap = [_cheapest_move(layer, skipped[layer], errors[layer], 0) for layer in skipped]
    heap = [move for move in heap if move is not None]
    heapq.heapify(heap)
    while heap and total < budget - _EPS * max(budget, 1.0):
        move = heapq.heappop(heap)
        gain = float(skipped[move.layer][move.row]) - spent[move.layer]
        if total + gain >= budget:
            spent[move.layer] += budget - total
            total = budget
            break
        spent[move.layer] += gain
        total += gain
        after = _cheapest_move(move.layer, skipped[move.layer], errors[move.layer], move.row)
        if after is not None:
            heapq.heappush(heap, after)
    return spent


def global_shares(
    plans: Sequence[BlockPlan],
    n_wrappers: int,
    trajectories: dict[int, torch.Tensor],
    errors: dict[int, torch.Tensor],
    sparsity: float,
) -> list[float]:
    """``global``: per wrapper, its share where :func:`global_block_sparsities` stops each block
    on its trajectory (recorded to full sparsity), the overheads paid for."""
    wrappers = [w for p in plans for w in p.wrappers]
    budget = skipped_weights_needed(wrappers, sparsity)
    skipped = {p.layer: trajectories[p.layer] @ _scope(p) for p in plans}  # (S + 1,) each
    spent = global_block_sparsities(skipped, errors, budget)
    return _spread(
        plans,
        n_wrappers,
        lambda p: shares_at(
            trajectories[p.layer], _scope(p), min(1.0, spent[p.layer] / _dense(p))
        ).tolist(),
    )


def tail_exponent(weight: torch.Tensor, fit_share: float = TAIL_FIT_SHARE) -> float:
    """Heavy-tail exponent alpha of a weight's empirical spectral density: a Hill fit,
    ``1 + k / sum(log(lambda_i / lambda_k))``, to the ``k`` largest eigenvalues of ``W^T W``.

    Args:
        weight: (O, I) weight matrix.
        fit_share: share of the eigenvalues (the largest) in the fit.

    Returns:
        alpha > 1; smaller means a heavier tail (HT-SR: a more trained matrix).

    Example:
        >>> round(tail_exponent(torch.randn(256, 256)), 1) > 2.0  # random: light tail
        True
    """
    singular = torch.linalg.svdvals(weight.detach().double().cpu())  # (K,) descending
    eigen = singular.square()
    k = max(2, int(len(eigen) * fit_share))
    tail = eigen[:k]
    logs = torch.log(tail / tail[-1].clamp_min(1e-300))
    return 1.0 + (k - 1) / max(float(logs[:-1].sum()), _EPS)


def tail_shares(wrappers: Sequence[SparseModule], sparsity: float) -> list[float]:
    """``tail``: per wrapper, a share in ``sparsity +- TAIL_SPREAD`` by the rank of its weight's
    heavy-tail exponent among the model's (linear in alpha: the heaviest tail gets the least),
    then shifted, clipped to [0, 1], so the wrappers skip :func:`skipped_weights_needed`.

    Example:
        >>> shares = tail_shares([w for _, w in wrapped], 0.5)  # deterministic: no data
    """
    alphas = torch.tensor([tail_exponent(_weight_of(w)) for w in wrappers], dtype=torch.float64)
    scope = torch.tensor([w.scope_weights for w in wrappers], dtype=torch.float64)  # (N,)
    span = float(alphas.max() - alphas.min())
    offsets = TAIL_SPREAD * (2.0 * (alphas - alphas.min()) / span - 1.0) if span > 0 else 0 * scope
    needed = skipped_weights_needed(wrappers, sparsity)
    low, high = -1.0 - TAIL_SPREAD, 2.0 + TAIL_SPREAD
    for _ in range(_BISECTION_STEPS):  # the centre whose clipped shares skip ``needed``
        middle = (low + high) / 2
        if float(((middle + offsets).clamp(0.0, 1.0) * scope).sum()) < needed:
            low = middle
        else:
            high = middle
    return (high + offsets).clamp(0.0, 1.0).tolist()


def _weight_of(wrapper: SparseModule) -> torch.Tensor:
    weight = getattr(wrapper, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise MoefyError(
            f"budget='tail' reads each projection's weight matrix; {wrapper.role} of layer "
            f"{wrapper.layer} has none: use budget='block'"
        )
    return weight


def greedy_reach_needed(plans: Sequence[BlockPlan], sparsity: float, rule: str) -> float:
    """How far the greedy trajectories must reach: full sparsity for ``global`` (so that every
    target reads off them), else the highest block target."""
    return 1.0 if rule == "global" else max(block_targets(plans, sparsity))


__all__ = [
    "TAIL_SPREAD",
    "block_shares",
    "block_targets",
    "global_block_sparsities",
    "global_shares",
    "greedy_reach_needed",
    "skipped_weights_needed",
    "tail_exponent",
    "tail_shares",
    "uniform_shares",
]
