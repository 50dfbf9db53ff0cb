"""``moefy finetune``: ReLUfy and train with a sparsity regulariser under a time or token budget."""

from __future__ import annotations

import argparse

from moefy.cli.args import (
    add_model_and_data,
    non_negative_float,
    positive_float,
    positive_int,
)

HELP = "raise activation sparsity by training: relufy, L1/Hoyer/ProSparse, distillation"
REPORT_FILE = "finetune_report.json"


# moefy.finetune.REGULARIZERS, spelled out so that --help does not import torch (a test checks)
REGULARIZERS = ("none", "l1", "hoyer", "prosparse")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=262144)
    parser.set_defaults(batch_size=4)
    parser.add_argument("--relufy", action="store_true", help="swap the FFN activation for ReLU")
    parser.add_argument(
        "--fatrelu", type=non_negative_float, default=0.0, help="with --relufy: FATReLU threshold"
    )
    parser.add_argument("--reg", choices=REGULARIZERS, default="prosparse", help="regulariser")
    parser.add_argument(
        "--reg-weight", type=non_negative_float, default=1e-2, help="(final) regulariser weight"
    )
    parser.add_argument("--reg-stages", type=positive_int, default=4, help="ProSparse stages")
    parser.add_argument(
        "--distill",
        type=non_negative_float,
        default=0.0,
        help="weight of KL to the original model's logits (0: none)",
    )
    parser.add_argument("--minutes", type=positive_float, default=None, help="time budget")
    parser.add_argument("--steps", type=positive_int, default=None, help="optimiser-step budget")
    parser.add_argument(
        "--train-tokens", type=positive_int, default=None, help="training-token budget"
    )
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="peak learning rate")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step")
    parser.add_argument(
        "--checkpoint-every", type=positive_int, default=50, help="steps between checkpoints"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order")
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=4096,
        help="evaluation tokens for perplexity and exact zeros before and after (0: skip)",
    )
    parser.add_argument("--out", default="runs/finetune", help="output folder (resumes if present)")


def _measure(model, blocks, batch_size: int) -> dict[str, float]:
    from moefy.eval.perplexity import perplexity
    from moefy.finetune.sparsity import exact_zero_share

    return {
        "perplexity": perplexity(model, blocks, batch_size).perplexity,
        "exact_zero": exact_zero_share(model, blocks, batch_size),
    }


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moefy import dist
    from moefy.cli.show import console, print_table
    from moefy.data.text import load_text
    from moefy.finetune import FinetuneConfig, finetune, relufy_
    from moefy.finetune.train import CHECKPOINT_DIR, CHECKPOINT_FILE
    from moefy.io import write_json
    from moefy.models.load import load_model

    config = FinetuneConfig(
        max_steps=args.steps,
        max_tokens=args.train_tokens,
        minutes=args.minutes,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        reg=args.reg,
        reg_weight=args.reg_weight,
        reg_stages=args.reg_stages,
        distill=args.distill,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    dist.init_from_env()
    main = dist.is_main_process()
    out = Path(args.out)
    with console().status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model)
    text = load_text(args.data)
    train_blocks = text.blocks(tokenizer, "calibration", args.block_len, args.tokens)
    eval_blocks = (
        text.blocks(tokenizer, "evaluation", args.block_len, args.eval_tokens)
        if args.eval_tokens > 0
        else None
    )
    before = _measure(model, eval_blocks, args.batch_size) if eval_blocks is not None else {}
    teacher = None
    if args.distill > 0:
        import copy

        teacher = copy.deepcopy(model)  # the original model, before any change
    if args.relufy:
        layers = relufy_(model, threshold=args.fatrelu)
        if main:
            console().print(f"relufied {layers} FFN layers")
        if eval_blocks is not None:
            before["relufied_perplexity"] = _measure(model, eval_blocks, args.batch_size)[
                "perplexity"
            ]
    resuming = (out / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()
    if main and resuming:
        console().print(f"resuming from {out / CHECKPOINT_DIR}")
    report = finetune(model, train_blocks, config, out=out, teacher=teacher, progress=main)
    after = _measure(model, eval_blocks, args.batch_size) if eval_blocks is not None else {}
    if not main:
        return 0
    _save_model(model, tokenizer, out)
    summary = {
        "model": args.model,
        "data": args.data,
        "relufy": args.relufy,
        "fatrelu": args.fatrelu,
        "before": before,
        "after": after,
        "eval_tokens": args.eval_tokens,
        "report": report.to_dict(),
    }
    write_json(out / REPORT_FILE, summary)
    if before and after:
        print_table(
            f"{args.model} on {args.data}: {report.steps} steps, {report.tokens} tokens, "
            f"{report.seconds / 60:.1f} min (stopped by {report.stopped_by})",
            [
                {
                    "": "before",
                    "perplexity": before["perplexity"],
                    "relufied, untrained": before.get("relufied_perplexity"),
                    "exact zeros": f"{before['exact_zero']:.1%}",
                },
                {
                    "": "after",
                    "perplexity": after["perplexity"],
                    "relufied, untrained": None,
                    "exact zeros": f"{after['exact_zero']:.1%}",
                },
            ],
        )
    console().print(f"model written to [bold]{out}[/bold] (train_log.csv, {REPORT_FILE})")
    return 0


def _save_model(model, tokenizer, out) -> None:
    """save_pretrained (and the tokenizer) into ``out`` file by file, each replaced atomically."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=out))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
