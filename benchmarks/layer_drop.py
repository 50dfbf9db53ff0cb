"""Layer dropping on SmolLM2-135M: perplexity and decode speed after dropping the 2, 4, 8 most
redundant attention layers, MLPs or blocks (LLM-Drop's similarity on calibration text).

For each part and count the script drops the most redundant ones, measures evaluation perplexity
and batch-1 greedy decode speed with the KV cache (prefill the prompt, then time ``--new-tokens``
single-token steps), and restores the model. Decode runs are interleaved: every repeat times the
dense model and all variants, in an order that rotates per repeat, so load from other processes
hits them alike; it reports the median tokens/s and the median of the per-repeat ratios to dense.

Run:
    .venv/bin/python benchmarks/layer_drop.py --tokens 4096 --eval-tokens 4096 --threads 2 \\
        --out runs/layer_drop.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moefy.cli.show import print_table
from moefy.data.text import load_text
from moefy.eval.perplexity import perplexity
from moefy.io import write_json
from moefy.layers import (
    DropConfig,
    LayerImportanceConfig,
    drop_layers_,
    layer_importance,
    plan_most_redundant,
    restore_layers,
)
from moefy.models.load import load_model

PARTS = {"attention": "attention", "mlp": "mlp", "block": "blocks"}


def _decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy batch-1 decode speed: ``new_tokens`` cached single-token steps after a prefill."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)  # prompt: (1, P)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)  # (1, 1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="bbc-news")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens (similarity)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="perplexity tokens")
    parser.add_argument("--block-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--counts", default="2,4,8", help="layers dropped per variant")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32, help="timed decode steps")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved decode repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]

    model, tokenizer = load_model(args.model)
    text = load_text(args.data)
    calibration = text.blocks(tokenizer, "calibration", args.block_len, args.tokens)
    evaluation = text.blocks(tokenizer, "evaluation", args.block_len, args.eval_tokens)
    started = time.perf_counter()
    importance = layer_importance(
        model, calibration, LayerImportanceConfig(batch_size=args.batch_size), progress=True
    )
    print(f"similarities: {time.perf_counter() - started:.1f} s on {calibration.n_tokens} tokens")

    variants: dict[str, DropConfig] = {"dense": DropConfig()}
    for part, argument in PARTS.items():
        for n in counts:
            variants[f"{part} x{n}"] = plan_most_redundant(importance, **{argument: n})

    def run_dropped(plan: DropConfig, measure):
        drop_layers_(model, **plan.indices())
        try:
            return measure()
        finally:
            restore_layers(model)

    ppl = {
        name: run_dropped(plan, lambda: perplexity(model, evaluation, args.batch_size).perplexity)
        for name, plan in variants.items()
    }
    prompt = evaluation.input_ids[:1, : args.prompt_tokens]  # (1, P)
    names = list(variants)
    speeds: dict[str, list[float]] = {name: [] for name in names}
    run_dropped(DropConfig(), lambda: _decode_tokens_per_second(model, prompt, args.new_tokens))
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            speeds[name].append(
                run_dropped(
                    variants[name],
                    lambda: _decode_tokens_per_second(model, prompt, args.new_tokens),
                )
            )
    rows = []
    for name in names:
        ratios = [v / d for v, d in zip(speeds[name], speeds["dense"], strict=True)]
        plan = variants[name]
        rows.append(
            {
                "variant": name,
                "dropped": ",".join(map(str, plan.attention + plan.mlp + plan.blocks)) or "-",
                "perplexity": ppl[name],
                "ppl / dense": ppl[name] / ppl["dense"],
                "decode tok/s": statistics.median(speeds[name]),
                "speed / dense": statistics.median(ratios),
            }
        )
    print_table(
        f"{args.model}: {evaluation.n_tokens} eval tokens, batch-1 decode of {args.new_tokens} "
        f"tokens after {prompt.shape[1]}, {args.repeats} interleaved repeats, "
        f"{torch.get_num_threads()} threads",
        rows,
    )
    if args.out:
        write_json(
            args.out,
            {
                "model": args.model,
                "data": args.data,
                "calibration_tokens": calibration.n_tokens,
                "eval_tokens": evaluation.n_tokens,
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "new_tokens": args.new_tokens,
                "prompt_tokens": prompt.shape[1],
                "importance": importance.to_dict(),
                "rows": rows,
                "speeds": speeds,
            },
        )


if __name__ == "__main__":
    main()
