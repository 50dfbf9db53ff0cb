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
from moefy.routing.routers import restore_selection, set_routing
from moefy.validate import keep_or_fraction

FAMILY = "moe-router"
DEFAULT_KEEP = (0.5, 0.25, 0.125)
DEFAULT_FRACTIONS = DEFAULT_KEEP  # its former name
DEFAULT_TAUS = (0.9, 0.8)


def route_quality(
    model: nn.Module,
    data: TokenBlocks,
    *,
    keep: Sequence[float] | None = None,
    taus: Sequence[float] = DEFAULT_TAUS,
    dense_perplexity: float | None = None,
    batch_size: int = 8,
    progress: bool = False,
    fractions: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Perplexity of a routed model at top-k shares kept and dynamic-k shares.

    The model's selection settings are restored on return.

    Args:
        model: a moefied model whose layers hold one router type (see :func:`train_routers`).
        data: evaluation blocks.
        keep: top-k shares of experts kept per token (default 0.5, 0.25, 0.125), rows
            ``<router>-top<percent>``.
        taus: dynamic-k shares (routers and the oracle), rows ``<router>-dyn<percent>``.
        dense_perplexity: the dense model's perplexity, for ``ppl_ratio`` (else omitted).
        batch_size: blocks per forward pass.
        progress: show progress bars.
        fractions: former name of ``keep`` (deprecated).

    Returns:
        Rows ``{family: "moe-router", method, level, rule, active_fraction, ffn_flops_ratio,
        perplexity, ppl_ratio}``; ``level`` is the keep share or tau.

    Example:
        >>> rows = route_quality(model, blocks, keep=[0.25], taus=[0.9])
    """
    keep = keep_or_fraction(keep, fractions, where="route_quality", old="fractions")
    keep = DEFAULT_KEEP if keep is None else keep
    layers = moe_layers(model)
    saved = [moe.selector.to_dict() for moe in layers]
    name = layers[0].selector.selector_type if layers else "none"
    has_rules = all(isinstance(moe.selector, RuleSelector) for moe in layers)
    budgets = [(TOPK, s) for s in keep] + [(DYNAMIC, t) for t in (taus if has_rules else ())]
    rows = []
    try:
        for rule, level in budgets:
            if rule == TOPK:
                set_routing(model, TOPK, keep=level)
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
        restore_selection(layers, saved)
        reset_tally(model)
    return rows
