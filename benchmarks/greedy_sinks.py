"""TEAL's greedy allocation with and without the attention-sink positions in its error measure.

The greedy search (``TEALConfig(greedy=True)``) spreads each block's target over its linear layers
by the block output error on calibration tokens. The first positions of every block (attention
sinks) have FFN outputs far larger than the rest; counted, they dominate the summed error.
``greedy_sink_positions`` leaves them out (default 4). This script calibrates TEAL on SmolLM2-135M
with each setting, at each target sparsity (one calibration per setting, reused across targets),
and prints perplexity on held-out BBC News text against the dense model, with the measured FFN
FLOPs.

Run: .venv/bin/python benchmarks/greedy_sinks.py [--calibration-tokens 2048]
     [--eval-tokens 2048] [--sparsity 0.5,0.65] [--sinks 0,4]
"""

from __future__ import annotations

import argparse
import copy
import time

from moefy import evaluate, load_model, load_text
from moefy.eval import EvalConfig
from moefy.sparsify import TEALConfig, sparsify_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--sparsity", default="0.5,0.65", help="target sparsities, comma-separated")
    parser.add_argument("--sinks", default="0,4", help="greedy_sink_positions values to compare")
    args = parser.parse_args()
    targets = sorted((float(s) for s in args.sparsity.split(",")), reverse=True)
    sinks = [int(s) for s in args.sinks.split(",")]

    dense, tokenizer = load_model("smollm2-135m")
    text = load_text("bbc-news")
    calibration = text.blocks(tokenizer, split="calibration", n_tokens=args.calibration_tokens)
    evaluation = text.blocks(tokenizer, split="evaluation", n_tokens=args.eval_tokens)
    config = EvalConfig(tasks=("perplexity",), tokens=args.eval_tokens)
    base = evaluate(dense, config, blocks=evaluation)
    print(f"dense perplexity {base.lm.perplexity:.3f}", flush=True)
    print("sinks  target  FFN FLOPs  perplexity  x dense  calibration s")
    for sink in sinks:
        reused = None
        for target in targets:  # the sparsest first: its greedy trajectory serves the others
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = sparsify_(
                model,
                TEALConfig(sparsity=target, greedy_sink_positions=sink),
                calibration,
                calibration=reused,
            )
            seconds = time.perf_counter() - start
            reused = report.calibration
            result = evaluate(model, config, blocks=evaluation)
            flops = result.cost.ffn_flops_per_token / base.cost.ffn_flops_per_token
            ratio = result.lm.perplexity / base.lm.perplexity
            print(
                f"{sink:5d}  {target:6.2f}  {flops:9.1%}  {result.lm.perplexity:10.3f}  "
                f"{ratio:7.3f}  {seconds:13.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
