"""Budget rules of the layerwise methods on SmolLM2-135M / BBC News: perplexity, measured share
of weights skipped and per-block shares for ``block``, ``global`` and ``tail``, each calibrated
once (sparsest level first, the others reuse it); ``--time`` instead times one calibration of
each method (``--methods``, specs as the sweep takes them) under each budget.

    python benchmarks/sparsify_budgets.py --budgets block,global,tail --levels 0.65,0.5
    python benchmarks/sparsify_budgets.py --time --budgets block --tokens 16384
    python benchmarks/sparsify_budgets.py --time --budgets global --tokens 16384 \
        --methods teal,scap,rotate,lowrank
"""

from __future__ import annotations

import argparse
import time

import torch

from moefy.data.text import load_text
from moefy.eval.perplexity import perplexity
from moefy.models.load import load_model
from moefy.sparsify import TEALConfig, measured_sparsity, reset_counters, sparsify_, unsparsify
from moefy.sparsify.config import config_from_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="block,global,tail")
    parser.add_argument("--levels", default="0.65,0.5", help="target sparsities, sparsest first")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--time", action="store_true", help="time one calibration per budget")
    parser.add_argument("--methods", default="teal", help="with --time: method specs to time")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m")
    text = load_text("bbc-news")
    calibration = text.blocks(tokenizer, "calibration", 256, args.tokens)
    budgets = args.budgets.split(",")
    if args.time:
        for method in args.methods.split(","):
            for budget in budgets:
                config = config_from_spec(method, sparsity=0.5, budget=budget)
                start = time.perf_counter()
                sparsify_(model, config, calibration)
                seconds = time.perf_counter() - start
                print(
                    f"method={method} budget={budget} tokens={calibration.n_tokens} "
                    f"calibration_s={seconds:.1f}"
                )
                unsparsify(model)
        return
    evaluation = text.blocks(tokenizer, "evaluation", 256, args.eval_tokens)
    dense = perplexity(model, evaluation).perplexity
    print(f"dense perplexity {dense:.3f}")
    for budget in budgets:
        reused = None
        for sparsity in (float(level) for level in args.levels.split(",")):
            start = time.perf_counter()
            report = sparsify_(
                model, TEALConfig(sparsity=sparsity, budget=budget), calibration, calibration=reused
            )
            seconds = time.perf_counter() - start
            reused = report.calibration
            reset_counters(model)
            ppl = perplexity(model, evaluation).perplexity
            measured = measured_sparsity(model)
            shares = [round(layer.weight_sparsity, 2) for layer in measured.layers]
            print(
                f"budget={budget} sparsity={sparsity} calibration_s={seconds:.1f} "
                f"x_dense={ppl / dense:.3f} measured={measured.total:.4f} blocks={shares}"
            )
            unsparsify(model)


if __name__ == "__main__":
    main()
