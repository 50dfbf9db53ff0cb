"""Quality of MoEfication: perplexity per split method and share of experts, oracle selection.

This is the table that answers "does clustering beat random splitting on my model?".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.eval.perplexity import perplexity
from moefy.moe.config import MoEfyConfig
from moefy.moe.convert import moefy_, reset_tally, set_selection, unmoefy
from moefy.moe.report import flops_report


def split_quality(
    model: nn.Module,
    data: TokenBlocks,
    methods: Sequence[str],
    fractions: Sequence[float],
    *,
    num_experts: int = 64,
    profile: Any = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Perplexity of ``model`` moefied by each method at each share of experts (oracle top-k).

    The model is left dense on return (each method is undone with ``unmoefy``).

    Args:
        model: a dense supported causal LM.
        data: evaluation blocks.
        methods: split methods (names in :data:`moefy.moe.split.SPLIT_METHODS`).
        fractions: shares of experts each token runs, in (0, 1].
        num_experts: experts per layer.
        profile: a SparsityProfile (co-activation counts for ``coactivation``, activation
            patterns for ``activation``).
        batch_size: blocks per forward pass.
        seed: split seed.
        progress: show progress bars.

    Returns:
        Rows ``{family, method, level, active_fraction, ffn_flops_ratio, perplexity,
        ppl_ratio}``, the dense row first (family ``dense``).

    Example:
        >>> rows = split_quality(model, blocks, ["random", "params"], [0.5, 0.25])
    """
    if not methods or not fractions:
        raise MoefyError("split_quality needs at least one method and one fraction")
    dense = perplexity(model, data, batch_size=batch_size, progress=progress).perplexity
    rows: list[dict[str, Any]] = [
        {
            "family": "dense",
            "method": "dense",
            "level": 1.0,
            "active_fraction": 1.0,
            "ffn_flops_ratio": 1.0,
            "perplexity": dense,
            "ppl_ratio": 1.0,
        }
    ]
    for method in methods:
        config = MoEfyConfig(num_experts=num_experts, method=method, seed=seed)
        moefy_(model, config, profile=profile if method == "coactivation" else None)
        try:
            for fraction in fractions:
                set_selection(model, keep=fraction)
                reset_tally(model)
                ppl = perplexity(model, data, batch_size=batch_size, progress=progress).perplexity
                report = flops_report(model)
                rows.append(
                    {
                        "family": "moe-oracle",
                        "method": method,
                        "level": float(fraction),
                        "active_fraction": report.active_fraction,
                        "ffn_flops_ratio": report.flops_ratio,
                        "perplexity": ppl,
                        "ppl_ratio": ppl / dense,
                    }
                )
        finally:
            unmoefy(model)
    return rows
