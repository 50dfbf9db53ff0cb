"""Exact-zero share and perplexity of a ReLU model under FATReLU thresholds (ProSparse's last step).

A ReLU model trained by ``moefy finetune --relufy`` zeroes the negative pre-activations; FATReLU
also zeroes small positive ones, trading a little perplexity for more exact zeros.

Run:
    .venv/bin/python benchmarks/fatrelu_scan.py --model runs/relu --thresholds 0,0.01,0.02,0.05
"""

from __future__ import annotations

import argparse

from moefy.cli.show import print_table
from moefy.data.text import load_text
from moefy.eval.perplexity import perplexity
from moefy.finetune import relufy_
from moefy.finetune.sparsity import exact_zero_share
from moefy.io import write_json
from moefy.models.load import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/relu")
    parser.add_argument("--data", default="bbc-news")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--thresholds", default="0,0.01,0.02,0.05,0.1")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    blocks = load_text(args.data).blocks(tokenizer, "evaluation", 256, args.eval_tokens)
    rows = []
    for threshold in (float(t) for t in args.thresholds.split(",")):
        relufy_(model, threshold=threshold)
        rows.append(
            {
                "threshold": threshold,
                "exact zeros": exact_zero_share(model, blocks),
                "perplexity": perplexity(model, blocks).perplexity,
            }
        )
    print_table(f"{args.model}: FATReLU thresholds on {args.eval_tokens} tokens", rows)
    if args.out:
        write_json(args.out, {"model": args.model, "eval_tokens": args.eval_tokens, "rows": rows})


if __name__ == "__main__":
    main()
