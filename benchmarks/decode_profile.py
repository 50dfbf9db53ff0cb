"""Where one compiled decode step spends its time: dense SmolLM2-135M against TEAL at 50 %.

``moefy bench --only decode --compile`` gives the ratio; this says what the step is made of.
Both models decode through :class:`moefy.decoding.StaticDecoder` (the TEAL copy is the bench's:
uniform thresholds on the FFN and attention inputs, 2,048 BBC News calibration tokens); each is
timed (best of ``--rounds`` generates of ``--new-tokens``) and then profiled with
``torch.profiler`` over ``--profile-tokens`` steps, its operators listed as milliseconds per
token (self time: the sparse kernel, torch's matrix products, the compiled graph's own code,
Dynamo's cache lookup). The steps do not count zeros (``count=False``), as ``moefy bench`` times
them.

Run: .venv/bin/python benchmarks/decode_profile.py [--threads 2] [--sparsity 0.5]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moefy.bench.variants import teal_copy
from moefy.decoding import StaticDecoder
from moefy.models.load import load_model

PROMPT_TOKENS = 16
ROWS = 8  # operators listed per model


def _ms_per_token(decoder: StaticDecoder, prompt: torch.Tensor, rounds: int, tokens: int) -> float:
    decoder.generate(prompt, 4)  # compiles
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        decoder.generate(prompt, tokens)
        best = min(best, (time.perf_counter() - start) / tokens)
    return best * 1e3


def _operators(decoder: StaticDecoder, prompt: torch.Tensor, tokens: int) -> list[tuple]:
    """(name, self ms per token, calls per token) of the costliest operators."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decoder.generate(prompt, tokens)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        (e.key[:60], e.self_cpu_time_total / 1e3 / tokens, e.count / tokens) for e in events[:ROWS]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--profile-tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    sparse = teal_copy(model, tokenizer, args.sparsity, "bbc-news")
    prompt = torch.randint(100, 1000, (1, PROMPT_TOKENS))
    length = PROMPT_TOKENS + max(args.new_tokens, args.profile_tokens, 4)
    timings = {}
    for label, net in (("dense", model), (f"teal {args.sparsity:g}", sparse)):
        decoder = StaticDecoder(net, max_length=length, count=False)  # as moefy bench times
        timings[label] = _ms_per_token(decoder, prompt, args.rounds, args.new_tokens)
        print(f"{label}: {timings[label]:.1f} ms/token ({args.threads} threads)")
        for name, ms, calls in _operators(decoder, prompt, args.profile_tokens):
            print(f"    {name:<60} {ms:7.2f} ms/token {calls:7.1f} calls/token")
    dense, teal = timings.values()
    print(f"speedup: {dense / teal:.2f}x")


if __name__ == "__main__":
    main()
