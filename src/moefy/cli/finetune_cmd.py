"""``moefy finetune``: ReLUfy and train with a sparsity regulariser under a time or token budget."""

from __future__ import annotations

import argparse

from moefy.cli.args import (
    add_device_and_dtype,
    add_eval_tokens,
    add_keep_option,
    add_model_and_data,
    add_output,
    claimed_output,
    is_writer,
    keep_option,
    non_negative_float,
    open_unit_float,
    positive_float,
    positive_int,
)

HELP = (
    "raise activation sparsity by training: relufy, L1/Hoyer/ProSparse, distillation; on a "
    "moefied model, MoE-aware fine-tuning with the routers in the loop"
)
REPORT_FILE = "finetune_report.json"
MODEL_STAGING = "model"  # the name its temporary folder is tagged with


# moefy.finetune.REGULARIZERS, spelled out so that --help does not import torch (a test checks)
REGULARIZERS = ("none", "l1", "hoyer", "prosparse")
# moefy.finetune.config.TRAINED_PARTS, likewise
TRAINED_PARTS = ("all", "routers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=262144)
    add_device_and_dtype(parser)
    # fp32 weights by default even on a GPU: AdamW steps vanish in bf16 weights
    parser.set_defaults(batch_size=4, dtype="fp32")
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
    moe = parser.add_argument_group("moefied models (MoE-aware fine-tuning)")
    add_keep_option(
        moe,
        former="--fraction",
        type=open_unit_float,
        default=None,
        help="train with top-k routing keeping this share of experts per token (default: the "
        "model's setting)",
    )
    moe.add_argument(
        "--tau",
        type=open_unit_float,
        default=None,
        help="train with dynamic-k routing at this share of the predicted norm",
    )
    moe.add_argument(
        "--router-loss",
        type=non_negative_float,
        default=1.0,
        help="weight of the routers' fit to the true expert norms (0: routers frozen in place)",
    )
    moe.add_argument(
        "--router-lr",
        type=positive_float,
        default=None,
        help="peak learning rate of the routers (default: --lr)",
    )
    moe.add_argument(
        "--efficiency",
        type=non_negative_float,
        default=0.0,
        help="weight of the Hoyer measure of each token's expert norms (fewer experts per token)",
    )
    moe.add_argument(
        "--straight-through",
        type=positive_float,
        default=None,
        metavar="T",
        help="the language-model and distillation losses train the routers too, through a "
        "straight-through estimate of the selection at temperature T (e.g. 0.5)",
    )
    moe.add_argument(
        "--train",
        choices=TRAINED_PARTS,
        default="all",
        help="what trains: every weight, or the routers only (the model frozen; with "
        "--straight-through and --distill the routers fit the model with every expert)",
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
    add_eval_tokens(
        parser,
        "evaluation tokens for perplexity and exact zeros before and after (0: skip)",
        default=4096,
        may_skip=True,
    )
    add_output(parser, "output folder (resumes if present)", default="runs/finetune", resume=True)


def _measure(model, blocks, batch_size: int) -> dict[str, float]:
    """Perplexity and exact-zero share in one pass; for a moefied model the active share too."""
    from moefy.eval.perplexity import perplexity
    from moefy.finetune.sparsity import count_zeros
    from moefy.moe.convert import moe_layers, reset_tally

    layers = moe_layers(model)
    if layers:
        reset_tally(model)
    with count_zeros(model) as zeros:
        result = {"perplexity": perplexity(model, blocks, batch_size).perplexity}
    result["exact_zero"] = zeros.share()
    if layers:
        result["active_experts"] = sum(m.active_fraction for m in layers) / len(layers)
    return result


def _set_moe_routing(model, args: argparse.Namespace) -> bool:
    """Apply --keep / --tau to a moefied model; False for a dense one (then they are errors)."""
    from moefy.errors import MoefyError
    from moefy.moe.convert import moe_layers

    if not moe_layers(model):
        given = [keep_option(args)] if args.keep is not None else []
        if args.tau is not None:
            given.append("--tau")
        if args.efficiency > 0:
            given.append("--efficiency")
        if args.straight_through is not None:
            given.append("--straight-through")
        if args.train != "all":
            given.append("--train")
        if given:
            raise MoefyError(
                f"{', '.join(given)} apply to moefied models; {args.model} has dense FFNs "
                "(moefy convert it first)"
            )
        return False
    if args.relufy:
        raise MoefyError(
            f"{args.model} is moefied: relufy the dense model, train it, then moefy convert it"
        )
    if args.keep is not None and args.tau is not None:
        raise MoefyError(f"give {keep_option(args)} (top-k) or --tau (dynamic k), not both")
    if args.keep is not None or args.tau is not None:
        from moefy.routing import set_routing

        if args.tau is not None:
            set_routing(model, "dynamic", tau=args.tau)
        else:
            set_routing(model, "topk", keep=args.keep)
    return True


def run(args: argparse.Namespace) -> int:
    import contextlib

    from moefy.io import working_folder

    # checked before any work and locked while it runs; --overwrite starts the folder afresh
    with claimed_output(args, "folder", resume=True) as out:
        writer = is_writer()
        folder = (
            working_folder(out, overwrite=args.overwrite) if writer else contextlib.nullcontext()
        )
        with folder:
            return _run(args)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moefy import dist
    from moefy.cli.args import device_and_dtype
    from moefy.cli.show import console, esc, status
    from moefy.data.text import load_text
    from moefy.finetune import finetune
    from moefy.finetune.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILE
    from moefy.models.load import load_model

    config = _finetune_config(args)
    device, dtype = device_and_dtype(args)
    dist.init_from_env(device)
    main = dist.is_main_process()
    out = Path(args.out)
    with status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    routed = _set_moe_routing(model, args)
    text = load_text(args.data)
    train_blocks = text.blocks(tokenizer, "calibration", args.block_len, args.tokens)
    eval_blocks = (
        text.blocks(tokenizer, "evaluation", args.block_len, args.eval_tokens)
        if args.eval_tokens > 0
        else None
    )
    before = _measure(model, eval_blocks, args.batch_size) if eval_blocks is not None else {}
    teacher = _teacher(model, args, routed)
    if args.relufy:
        _relufy(model, args, eval_blocks, before, main)
    resuming = (out / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()
    if main and resuming:
        console().print(f"resuming from {esc(out / CHECKPOINT_DIR)}")
    report = finetune(model, train_blocks, config, out=out, teacher=teacher, progress=main)
    after = _measure(model, eval_blocks, args.batch_size) if eval_blocks is not None else {}
    if not main:
        return 0
    _save_model(model, tokenizer, out)
    _write_report(args, out, report, routed=routed, before=before, after=after)
    console().print(f"model written to [bold]{esc(out)}[/bold] (train_log.csv, {REPORT_FILE})")
    return 0


def _finetune_config(args: argparse.Namespace):
    """The :class:`moefy.finetune.FinetuneConfig` the options ask for."""
    from moefy.finetune import FinetuneConfig

    return FinetuneConfig(
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
        router_loss=args.router_loss,
        router_lr=args.router_lr,
        efficiency=args.efficiency,
        straight_through=args.straight_through,
        train=args.train,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )


def _teacher(model, args: argparse.Namespace, routed: bool):
    """The distillation teacher: the original model, before any change (moefied: every expert
    running, i.e. dense); None without ``--distill``."""
    if args.distill <= 0:
        return None
    import copy

    from moefy.finetune.moe_aware import all_experts_teacher

    return all_experts_teacher(model) if routed else copy.deepcopy(model)


def _relufy(model, args: argparse.Namespace, eval_blocks, before: dict, main: bool) -> None:
    """Swap the FFN activations for (FAT)ReLU; the untrained perplexity goes into ``before``."""
    from moefy.cli.show import console
    from moefy.finetune import relufy_

    layers = relufy_(model, threshold=args.fatrelu)
    if main:
        console().print(f"relufied {layers} FFN layers")
    if eval_blocks is not None:
        before["relufied_perplexity"] = _measure(model, eval_blocks, args.batch_size)["perplexity"]


def _write_report(
    args: argparse.Namespace, out, report, *, routed: bool, before: dict, after: dict
) -> None:
    """Write :data:`REPORT_FILE` and print the before / after table."""
    from moefy.cli.show import print_table
    from moefy.io import write_json

    summary = {
        "model": args.model,
        "data": args.data,
        "relufy": args.relufy,
        "fatrelu": args.fatrelu,
        "moe_aware": routed,
        "before": before,
        "after": after,
        "eval_tokens": args.eval_tokens,
        "report": report.to_dict(),
    }
    write_json(out / REPORT_FILE, summary)
    if not (before and after):
        return
    rows = []
    for name, figures in (("before", before), ("after", after)):
        row = {"": name, "perplexity": figures["perplexity"]}
        if args.relufy:
            row["relufied, untrained"] = figures.get("relufied_perplexity")
        row["exact zeros"] = f"{figures['exact_zero']:.1%}"
        if routed:
            row["active experts"] = f"{figures['active_experts']:.1%}"
        rows.append(row)
    print_table(
        f"{args.model} on {args.data}: {report.steps} steps, {report.tokens} tokens, "
        f"{report.seconds / 60:.1f} min (stopped by {report.stopped_by})",
        rows,
    )


def _save_model(model, tokenizer, out) -> None:
    """The model (dense: save_pretrained; moefied: moefy's MoE format) and the tokenizer into
    ``out`` file by file, each replaced atomically, beside the checkpoint and log."""
    import os
    import shutil

    from moefy.io import remove_stale_temporaries, temporary_sibling
    from moefy.moe import moe_layers, save

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out / MODEL_STAGING)  # what a killed run left
    tmp = temporary_sibling(out / MODEL_STAGING)
    try:
        source = tmp
        if moe_layers(model):
            source = save(model, tmp / "model", tokenizer=tokenizer)
        else:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        for item in source.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
