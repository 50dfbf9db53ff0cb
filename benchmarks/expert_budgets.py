"""Per-layer expert budgets against one uniform k, at the same FFN FLOPs.

SmolLM2-135M is moefied (experts of 8 neurons split by parameters, oracle selector). At each
budget ``keep`` (share of the dense FFN FLOPs) the script evaluates perplexity on held-out BBC
News text with (a) the same k in every layer (``keep`` of the experts), (b) the per-layer k of
:func:`moefy.moe.allocate_experts` (greedy on each layer's error curve relative to the residual
stream, calibrated on BBC News calibration text), top-k, (c) the same allocation as a per-layer
dynamic-k share tau, and (d) the allocation with errors relative to each layer's own output.
It prints the measured FFN FLOPs share, perplexity and its ratio to dense, and the allocation's
time.

Run: .venv/bin/python benchmarks/expert_budgets.py [--calibration-tokens 2048]
     [--eval-tokens 2048] [--keep 0.5,0.25]
"""

from __future__ import annotations

import argparse
import time

from moefy import evaluate, load_model, load_text
from moefy.eval import EvalConfig
from moefy.moe import MoEfyConfig, allocate_experts, moefy_
from moefy.routing import set_routing

SPLIT = MoEfyConfig(expert_size=8, method="params")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--keep", default="0.5,0.25", help="FLOPs budgets, comma-separated")
    args = parser.parse_args()
    keeps = [float(k) for k in args.keep.split(",")]

    model, tokenizer = load_model("smollm2-135m")
    text = load_text("bbc-news")
    calibration = text.blocks(tokenizer, split="calibration", n_tokens=args.calibration_tokens)
    evaluation = text.blocks(tokenizer, split="evaluation", n_tokens=args.eval_tokens)
    config = EvalConfig(tasks=("perplexity",), tokens=args.eval_tokens)
    base = evaluate(model, config, blocks=evaluation)
    print(f"dense perplexity {base.lm.perplexity:.3f}", flush=True)
    start = time.perf_counter()
    moefy_(model, SPLIT)
    print(f"moefied (experts of {SPLIT.expert_size}) in {time.perf_counter() - start:.0f} s")
    print("keep  variant              FFN FLOPs  perplexity  x dense  allocation s  k per layer")
    for keep in keeps:
        set_routing(model, "topk", keep=keep)
        _row(keep, "uniform top-k", evaluate(model, config, blocks=evaluation), base, None)
        for rule, error in (("topk", "residual"), ("dynamic", "residual"), ("topk", "output")):
            report = allocate_experts(model, calibration, keep, rule=rule, error=error)
            result = evaluate(model, config, blocks=evaluation)
            _row(keep, f"{error} {rule}", result, base, report)


def _row(keep, variant, result, base, report) -> None:
    flops = result.cost.ffn_flops_per_token / base.cost.ffn_flops_per_token
    ratio = result.lm.perplexity / base.lm.perplexity
    seconds = f"{report.seconds:12.1f}" if report else " " * 12
    ks = ",".join(str(k) for k in report.ks) if report else ""
    print(
        f"{keep:4.2f}  {variant:19s}  {flops:9.1%}  {result.lm.perplexity:10.3f}  {ratio:7.3f}  "
        f"{seconds}  {ks}",
        flush=True,
    )


if __name__ == "__main__":
    main()
