"""``moefy generate``: decode with the sparse fast path and print tokens/s beside dense."""

from __future__ import annotations

import argparse

from moefy.cli.args import add_device_and_dtype, device_and_dtype, positive_int

HELP = "generate text with a moefied or sparsified model; print tokens/s beside dense"
BACKENDS = ("auto", "reference", "cpu", "triton")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="a moefy folder (moefied or sparsified), a built-in name"
    )
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="tokens to generate (>= 2)"
    )
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="kernel backend")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    parser.add_argument(
        "--rounds", type=positive_int, default=1, help="timed generates per model (medians)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode with a static KV cache and a torch.compile'd step (CUDA graphs on a GPU), "
        "dense and sparse alike; compiling takes about a minute per model",
    )
    add_device_and_dtype(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from moefy.kernels.backend import use_backend

    threads = torch.get_num_threads()
    try:  # the backend and thread count are the process's: a caller's own come back after
        with use_backend(args.backend):
            if args.threads:
                torch.set_num_threads(args.threads)
            return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    import torch

    from moefy.bench import decode_speeds, dense_copy
    from moefy.bench.decode import generate_exactly
    from moefy.cli.show import console, esc, print_table, status
    from moefy.errors import MoefyError
    from moefy.models.load import is_causal_lm, load_model
    from moefy.moe import OracleSelector, moe_layers
    from moefy.sparsify.wrappers import sparse_modules

    if args.max_new_tokens < 2:
        raise MoefyError("--max-new-tokens must be at least 2 to time decoding")
    device, dtype = device_and_dtype(args)
    with status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    if tokenizer is None or not is_causal_lm(model):
        raise MoefyError(f"{args.model} is not a causal LM with a tokenizer: generate needs both")
    layers = moe_layers(model)
    if not layers and next(sparse_modules(model), None) is None:
        console().print("note: the model is neither moefied nor sparsified; both rows are dense")
    if any(isinstance(m.selector, OracleSelector) and not m.selector.selects_all() for m in layers):
        console().print(
            "note: oracle selection computes every expert to rank them (no speed-up); "
            "train or attach routers (moefy train-routers) for speed"
        )
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)  # (1, T)
    if prompt.shape[1] == 0:
        raise MoefyError("the prompt is empty after tokenizing: give some text")
    text = tokenizer.decode(
        generate_exactly(model, prompt, args.max_new_tokens)[0, prompt.shape[1] :],
        skip_special_tokens=True,
    )
    console().print(f"[bold]{esc(args.prompt)}[/bold]{esc(text)}")
    models = {"dense": dense_copy(model), "sparse": model}
    with status("compiling and timing" if args.compile else "timing"):
        speeds = decode_speeds(
            models, prompt, args.max_new_tokens, rounds=args.rounds, compiled=args.compile
        )
    dense = speeds["dense"]
    step = "compiled static-cache step" if args.compile else "generate"
    print_table(
        f"decode speed ({step}), {args.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} thread(s), backend {args.backend}",
        [
            {
                "model": name,
                "tokens/s": speed.tokens_per_second,
                "ms/token": speed.seconds_per_token * 1e3,
                "MB read/token": speed.bytes_per_token / 1e6,
                "speedup": f"{dense.seconds_per_token / speed.seconds_per_token:.2f}x",
                "bandwidth limit": f"{dense.bytes_per_token / speed.bytes_per_token:.2f}x",
            }
            for name, speed in speeds.items()
        ],
    )
    return 0
