"""What load balancing costs a decode batch: the share of each layer's experts B tokens read.

The model is moefied (:data:`SPLIT`) and runs the oracle's top-k at the bench's first expert
fraction. A batch of B sequences decoding one token each reads the union of the experts its B
tokens select; the table gives its mean share of the layer's experts, averaged over layers, at
each B of :data:`BATCH_SIZES`, without and with the auxiliary-loss-free load bias
(:func:`moefy.routing.balance.balance_load`, fitted on calibration text). The union is measured
on held-out text (B random tokens per batch). Evening out the load spreads a batch's tokens over
more experts, so a balanced router reads more weights per decode step.
"""

from __future__ import annotations

from typing import Any

from moefy.moe import MoEfyConfig, moe_layers, moefy_
from moefy.moe.budget import collect_layer_inputs
from moefy.routing import set_routing
from moefy.routing.balance import balance_load, expert_union

# A random split converts in seconds; the oracle's skew over experts is the model's own.
SPLIT = MoEfyConfig(expert_size=16, method="random")
TOKENS = 1024  # of calibration text (the bias), and as many held out (the union)
BATCH_SIZES = (1, 4, 16)


def run_balance_bench(
    model_name: str, data: str, keep: float, *, tokens: int = TOKENS, say=None
) -> list[dict[str, Any]]:
    """Union of experts read per decode batch, plain top-k against balanced top-k.

    Args:
        model_name: built-in name or folder of the model (see :func:`moefy.load_model`).
        data: built-in text for calibration and measurement.
        keep: share of each layer's experts every token runs (oracle top-k).
        tokens: tokens of calibration text to fit the bias on, and of held-out text to measure
            the union on.
        say: optional ``str -> None`` told what is being measured.

    Returns:
        Rows ``{"variant", "batch", "read", "imbalance", "keep", "experts", "balance_s"}``:
        ``read`` is the mean share of a layer's experts a batch of ``batch`` tokens reads,
        ``imbalance`` the mean over layers of the most-loaded expert's load over the mean.

    Example:
        >>> rows = run_balance_bench("smollm2-135m", "bbc-news", 0.25)
        >>> [(r["variant"], r["batch"]) for r in rows][:2]
        [('top-k', 1), ('top-k', 4)]
    """
    from moefy.data.text import load_text
    from moefy.models.load import load_model

    say = say or (lambda _message: None)
    say(f"balance: moefying {model_name} (experts of {SPLIT.expert_size})")
    model, tokenizer = load_model(model_name)
    moefy_(model, SPLIT)
    set_routing(model, "topk", keep=keep)
    text = load_text(data)
    say("balance: fitting the load bias and measuring the union of experts read")
    calibration = _layer_inputs(model, text.blocks, tokenizer, "calibration", tokens)
    held_out = _layer_inputs(model, text.blocks, tokenizer, "evaluation", tokens)
    plain = expert_union(model, inputs=held_out, batch_sizes=BATCH_SIZES)
    report = balance_load(model, inputs=calibration)
    balanced = expert_union(model, inputs=held_out, batch_sizes=BATCH_SIZES)
    experts = moe_layers(model)[0].num_experts
    rows = []
    for variant, union, imbalance in (
        ("top-k", plain, report.mean_imbalance[0]),
        ("top-k + balancing", balanced, report.mean_imbalance[1]),
    ):
        for batch, share in zip(union.batch_sizes, union.mean, strict=True):
            rows.append(
                {
                    "variant": variant,
                    "batch": batch,
                    "read": share,
                    "imbalance": imbalance,
                    "keep": keep,
                    "experts": experts,
                    "balance_s": report.seconds,
                }
            )
    return rows


def _layer_inputs(model, blocks_of, tokenizer, split: str, n_tokens: int) -> list:
    """Every MoE layer's sampled inputs on ``n_tokens`` tokens of one split of the text."""
    blocks = blocks_of(tokenizer, split=split, n_tokens=n_tokens)
    return collect_layer_inputs(model, blocks, tokens_per_layer=n_tokens)
