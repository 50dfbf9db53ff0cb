"""Quality of training-free activation sparsity on SmolLM2-135M: measured sparsity vs perplexity.

For each method (top-k, CATS, CHESS, TEAL, WINA) and target sparsity (25, 40, 50, 65 %), the model
is calibrated on bbc-news calibration text, then perplexity and the measured sparsity (share of
FFN weight reads a kernel skips, counted by the wrappers on the evaluation text itself) are taken
on bbc-news evaluation text, next to the dense model's perplexity from the same run. One
calibration per method is reused across levels (highest first), as TEAL's lookup tables are.

Run:
    .venv/bin/python benchmarks/sparsify_quality.py --out runs/bench/sparsify_quality.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

LEVELS = (0.25, 0.40, 0.50, 0.65)
METHODS = ("topk", "cats", "chess", "teal", "wina")
# extra rows on request (--methods): name -> (method, config fields)
VARIANTS = {
    "teal-uniform": ("teal", {"greedy": False}),
    "wina-uniform": ("wina", {"greedy": False}),
    "teal-attention": ("teal", {"attention": True}),
}
ROW_ORDER = (*METHODS, *VARIANTS)
MODEL = "smollm2-135m"
TEXT = "bbc-news"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--block-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, from {', '.join(ROW_ORDER)}",
    )
    parser.add_argument(
        "--levels", default=",".join(str(x) for x in LEVELS), help="comma-separated"
    )
    parser.add_argument("--out", default="runs/bench/sparsify_quality.json", help="JSON rows")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Run the benchmark; print a table, write the rows as JSON and return them."""
    from moefy.cli.show import print_table
    from moefy.data.text import load_text
    from moefy.eval.perplexity import perplexity
    from moefy.io import write_json
    from moefy.models.load import load_model
    from moefy.sparsify import (
        config_from_dict,
        measured_sparsity,
        reset_counters,
        sparsify_,
        unsparsify,
    )

    args = _parse(argv)
    levels = sorted((float(x) for x in args.levels.split(",")), reverse=True)
    model, tokenizer = load_model(MODEL)
    text = load_text(TEXT)
    calibration_blocks = text.blocks(
        tokenizer, "calibration", block_len=args.block_len, n_tokens=args.calibration_tokens
    )
    evaluation_blocks = text.blocks(
        tokenizer, "evaluation", block_len=args.block_len, n_tokens=args.eval_tokens
    )
    start = time.perf_counter()
    dense = perplexity(model, evaluation_blocks, args.batch_size).perplexity
    print(f"dense perplexity {dense:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    rows: list[dict[str, object]] = [
        {
            "method": "dense",
            "target": 0.0,
            "measured_sparsity": 0.0,
            "zero_activations": 0.0,
            "perplexity": dense,
            "ratio": 1.0,
            "calibration_s": 0.0,
        }
    ]
    for method in args.methods.split(","):
        calibration = None
        for level in levels:
            base, extra = VARIANTS.get(method, (method, {}))
            config = config_from_dict(
                {"method": base, "sparsity": level}
                | ({} if base == "topk" else {"batch_size": args.batch_size})
                | extra
            )
            report = sparsify_(
                model, config, calibration_blocks, calibration=calibration, progress=args.progress
            )
            calibration = report.calibration
            reset_counters(model)
            sparse = perplexity(model, evaluation_blocks, args.batch_size).perplexity
            measured = measured_sparsity(model)
            unsparsify(model)
            row = {
                "method": method,
                "target": level,
                "measured_sparsity": measured.total,
                "zero_activations": measured.activation_sparsity,
                "perplexity": sparse,
                "ratio": sparse / dense,
                "calibration_s": report.seconds,
            }
            rows.append(row)
            print(
                f"{method:6s} target {level:.2f}: weights skipped {measured.total:.3f}, zero "
                f"activations {measured.activation_sparsity:.3f}, perplexity {sparse:.3f} "
                f"(x{sparse / dense:.3f}), calibration {report.seconds:.0f} s",
                flush=True,
            )
    ordered = [
        rows[0],
        *sorted(rows[1:], key=lambda r: (ROW_ORDER.index(r["method"]), r["target"])),
    ]
    print_table(
        f"{MODEL}: {args.calibration_tokens} calibration / {args.eval_tokens} evaluation tokens of "
        f"{TEXT}; measured sparsity = share of FFN weight reads skipped on the evaluation text",
        [
            {
                "method": r["method"],
                "target %": 100 * r["target"],
                "measured %": 100 * r["measured_sparsity"],
                "zero act. %": 100 * r["zero_activations"],
                "perplexity": r["perplexity"],
                "ratio": r["ratio"],
            }
            for r in ordered
        ],
    )
    write_json(
        args.out,
        {
            "model": MODEL,
            "text": TEXT,
            "calibration_tokens": calibration_blocks.n_tokens,
            "evaluation_tokens": evaluation_blocks.n_tokens,
            "rows": ordered,
        },
    )
    return ordered


if __name__ == "__main__":
    main()
