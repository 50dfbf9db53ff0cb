"""MoEfication of a small ReLU GPT-2 trained in-process: split method x share of experts.

Trains a 4-layer, d=256 GPT-2 with ReLU FFNs (d_ff=1024) for about 150 s on the calibration split
of the shipped Shakespeare text (tokenizer: a 4096-token byte-level BPE trained on the same text
in-process), profiles its co-activations (``active_rule="nonzero"``), then for each split method
(random, params, coactivation) runs the MoE at 50 / 25 / 12.5 % of experts with oracle selection
and reports evaluation-split perplexity and its ratio to dense. Goal: the best method at
25 % within 1.15x of dense.

Run: .venv/bin/python benchmarks/relu_gpt2_moefication.py [--train-seconds 150] [--experts 64]
     [--threads 1] [--json runs/relu_gpt2_moe.json]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import transformers

from moefy.data.text import load_text
from moefy.eval.perplexity import perplexity
from moefy.io import write_json
from moefy.moe import MoEfyConfig, flops_report, moefy_, reset_tally, set_selection, unmoefy
from moefy.profiling import ProfileConfig, profile

VOCAB = 4096
BLOCK_LEN = 128
D_MODEL, D_FF, LAYERS, HEADS = 256, 1024, 4, 4
BATCH = 16
PEAK_LR, WARMUP_STEPS, WEIGHT_DECAY = 3e-3, 50, 0.01
EVAL_TOKENS = 16_384
PROFILE_TOKENS = 16_384
METHODS = ("random", "params", "coactivation")
FRACTIONS = (0.5, 0.25, 0.125)
GOAL_RATIO = 1.15


def _train_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def _model(eos_id: int) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=BLOCK_LEN,
        n_embd=D_MODEL,
        n_inner=D_FF,
        n_layer=LAYERS,
        n_head=HEADS,
        activation_function="relu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    return transformers.GPT2LMHeadModel(config)


def _train(model: torch.nn.Module, train_ids: torch.Tensor, seconds: float) -> int:
    """AdamW with warm-up and a cosine decay over the wall-clock budget; returns steps taken."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(0)
    model.train()
    start, step = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds:
        progress = elapsed / seconds
        lr = (
            PEAK_LR * min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * progress))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = torch.randint(train_ids.shape[0], (BATCH,), generator=generator)
        batch = train_ids[rows]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
    model.eval()
    return step


def _zero_fraction(model: torch.nn.Module, blocks: torch.Tensor) -> list[float]:
    """Share of exactly-zero FFN activations per layer on ``blocks``."""
    fractions: list[float] = []
    handles = [
        block.mlp.act.register_forward_hook(
            lambda _m, _i, out: fractions.append(float((out == 0).float().mean()))
        )
        for block in model.transformer.h
    ]
    try:
        with torch.no_grad():
            model(input_ids=blocks)
    finally:
        for handle in handles:
            handle.remove()
    return fractions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seconds", type=float, default=150.0)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()

    text = load_text("shakespeare")
    t0 = time.perf_counter()
    tokenizer = _train_tokenizer(text.split("calibration"))
    train = text.blocks(tokenizer, "calibration", block_len=BLOCK_LEN)
    evaluation = text.blocks(tokenizer, "evaluation", block_len=BLOCK_LEN, n_tokens=EVAL_TOKENS)
    print(
        f"tokenizer: BPE {VOCAB} in {time.perf_counter() - t0:.1f} s; train {train.n_tokens} "
        f"tokens, evaluation {evaluation.n_tokens} tokens"
    )
    model = _model(tokenizer.eos_token_id)
    steps = _train(model, train.input_ids, args.train_seconds)
    zeros = _zero_fraction(model, evaluation.input_ids[:8])
    print(
        f"trained {steps} steps of {BATCH}x{BLOCK_LEN} tokens in {args.train_seconds:.0f} s; "
        f"exact zeros per layer: {', '.join(f'{z:.0%}' for z in zeros)}"
    )
    dense = perplexity(model, evaluation).perplexity
    print(f"dense perplexity: {dense:.2f}")

    calibration = text.blocks(tokenizer, "calibration", BLOCK_LEN, n_tokens=PROFILE_TOKENS)
    sparsity = profile(
        model, calibration, ProfileConfig(batch_size=16, active_rule="nonzero", coactivation=True)
    )

    rows = [
        {
            "method": "dense",
            "level": 1.0,
            "active_fraction": 1.0,
            "perplexity": dense,
            "ratio_to_dense": 1.0,
            "split_seconds": 0.0,
        }
    ]
    for method in METHODS:
        start = time.perf_counter()
        config = MoEfyConfig(num_experts=args.experts, method=method, seed=args.seed)
        moefy_(model, config, profile=sparsity)
        split_seconds = time.perf_counter() - start
        for fraction in FRACTIONS:
            set_selection(model, keep=fraction)
            reset_tally(model)
            ppl = perplexity(model, evaluation).perplexity
            rows.append(
                {
                    "method": method,
                    "level": fraction,
                    "active_fraction": flops_report(model).active_fraction,
                    "perplexity": ppl,
                    "ratio_to_dense": ppl / dense,
                    "split_seconds": split_seconds,
                }
            )
        unmoefy(model)

    print(f"\nReLU GPT-2 (4 x 256, d_ff {D_FF}), {args.experts} experts, oracle selection")
    print(f"{'method':<13} {'experts':>8} {'measured':>9} {'perplexity':>11} {'x dense':>8}")
    for row in rows:
        print(
            f"{row['method']:<13} {row['level']:>8.1%} {row['active_fraction']:>9.1%} "
            f"{row['perplexity']:>11.2f} {row['ratio_to_dense']:>8.3f}"
        )
    best = min((r for r in rows if r["level"] == 0.25), key=lambda r: r["ratio_to_dense"])
    verdict = "met" if best["ratio_to_dense"] <= GOAL_RATIO else "missed"
    print(
        f"best at 25 %: {best['method']} at {best['ratio_to_dense']:.3f}x dense "
        f"(goal {GOAL_RATIO}x: {verdict})"
    )
    if args.json:
        write_json(args.json, rows)
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
