"""Quality of routed MoE models: perplexity per router and selection budget.

The table that answers "how close does my router get to the oracle at the same budget?".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.dist import all_reduce_sum_
from moefy.eval.perplexity import perplexity
from moefy.moe.convert import moe_layers, reset_tally
from moefy.moe.report import flops_report
from moefy.moe.selectors import DYNAMIC, TOPK, RuleSelector
from moefy.routing.routers import set_routing

FAMILY = "moe-router"
DEFAULT_FRACTIONS = (0.5, 0.25, 0.125)
DEFAULT_TAUS = (0.9, 0.8)


def route_quality(
    model: nn.Module,
    data: TokenBlocks,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    taus: Sequence[float] = DEFAULT_TAUS,
    dense_perplexity: float | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Perplexity of a routed model at top-k fractions and dynamic-k shares.

    The model's selection settings are restored on return.

    Args:
        model: a moefied model whose layers hold one router type (see :func:`train_routers`).
        data: evaluation blocks.
        fractions: top-k shares of experts, rows ``<router>-top<percent>``.
        taus: dynamic-k shares (routers and the oracle), rows ``<router>-dyn<percent>``.
        dense_perplexity: the dense model's perplexity, for ``ppl_ratio`` (else omitted).
        batch_size: blocks per forward pass.
        progress: show progress bars.

    Returns:
        Rows ``{family: "moe-router", method, level, rule, active_fraction, ffn_flops_ratio,
        perplexity, ppl_ratio}``; ``level`` is the fraction or tau.

    Example:
        >>> rows = route_quality(model, blocks, fractions=[0.25], taus=[0.9])
    """
    layers = moe_layers(model)
    saved = [moe.selector.to_dict() for moe in layers]
    name = layers[0].selector.selector_type if layers else "none"
    has_rules = all(isinstance(moe.selector, RuleSelector) for moe in layers)
    budgets = [(TOPK, f) for f in fractions] + [(DYNAMIC, t) for t in (taus if has_rules else ())]
    rows = []
    try:
        for rule, level in budgets:
            if rule == TOPK:
                set_routing(model, TOPK, fraction=level)
            else:
                set_routing(model, rule, tau=level)
            reset_tally(model)
            ppl = perplexity(model, data, batch_size=batch_size, progress=progress).perplexity
            for moe in layers:  # under torchrun each rank counted its shard's selections
                all_reduce_sum_(moe.selection_counts)
                all_reduce_sum_(moe.tokens_seen)
            report = flops_report(model)
            tag = "top" if rule == TOPK else "dyn"
            row = {
                "family": FAMILY,
                "method": f"{name}-{tag}{100 * level:g}",
                "level": float(level),
                "rule": rule,
                "active_fraction": report.active_fraction,
                "ffn_flops_ratio": report.flops_ratio,
                "perplexity": ppl,
            }
            if dense_perplexity:
                row["ppl_ratio"] = ppl / dense_perplexity
            rows.append(row)
    finally:
        for moe, old in zip(layers, saved, strict=True):
            moe.selector.set_topk(k=old["k"], fraction=old["fraction"])
            if isinstance(moe.selector, RuleSelector):
                moe.selector.set_rule(old.get("rule", TOPK), old.get("tau"))
        reset_tally(model)
    return rows
