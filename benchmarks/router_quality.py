"""Router quality on SmolLM2-135M: learned and similarity routers against the oracle.

Loads a moefied model (``--moe``, e.g. ``runs/moe`` from ``make demo``: 64 experts from the
co-activation split) or moefies ``--model`` with the ``params`` split, trains ``mlp`` routers on
bbc-news calibration text and compares evaluation perplexity of oracle, mlp and centroid
selection at the same shares of experts (top-k) and the same shares of the norm (dynamic k, the
oracle on true norms and the router on predicted ones). Prints one table with ratios to the
dense model and to the oracle at the same budget, measured in the same run, the router FLOPs as
a share of the expert FLOPs they save, the training time and the machine load.

Run:
    .venv/bin/python benchmarks/router_quality.py --moe runs/moe --calib-tokens 8192 \\
        --eval-tokens 8192 --keep 0.5,0.25,0.125 --taus 0.9,0.8 --threads 2
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--moe", default=None, help="a moefied folder (else moefy --model)")
    parser.add_argument("--data", default="bbc-news")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--loss", default="listwise", help="router training loss")
    parser.add_argument("--rounds", type=int, default=1, help="router training rounds")
    parser.add_argument("--keep", "--fractions", dest="keep", default="0.5,0.25")
    parser.add_argument("--taus", default="0.9,0.8")
    parser.add_argument("--no-centroid", action="store_true", help="skip the centroid router")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument("--results", default=None, help="results file to add rows to")
    args = parser.parse_args()

    import torch

    from moefy.cli.show import print_table
    from moefy.data.text import load_text
    from moefy.eval.perplexity import perplexity
    from moefy.models.load import load_model
    from moefy.moe import MoEfyConfig, OracleSelector, moe_layers, moefy_, set_selection
    from moefy.routing import RouterConfig, attach_routers, route_quality, train_routers
    from moefy.routing.quality import FAMILY

    torch.set_num_threads(args.threads)
    keep = [float(f) for f in args.keep.split(",") if f]
    taus = [float(t) for t in args.taus.split(",") if t]
    model, tokenizer = load_model(args.moe or args.model)
    text = load_text(args.data)
    calib = text.blocks(tokenizer, "calibration", n_tokens=args.calib_tokens)
    evaluation = text.blocks(tokenizer, "evaluation", n_tokens=args.eval_tokens)
    if args.moe is None:
        started = time.perf_counter()
        moefy_(model, MoEfyConfig(num_experts=args.experts, method="params"))
        print(f"moefy_: {time.perf_counter() - started:.0f} s", flush=True)
    for moe in moe_layers(model):
        moe.selector = OracleSelector(moe.num_experts)
    set_selection(model)  # every expert: the dense model
    dense = perplexity(model, evaluation).perplexity
    print(f"dense perplexity {dense:.3f}", flush=True)

    rows = route_quality(model, evaluation, keep=keep, taus=taus, dense_perplexity=dense)
    print(*rows, sep="\n", flush=True)

    if not args.no_centroid:
        attach_routers(model, "centroid")
        rows += route_quality(model, evaluation, keep=keep, taus=[], dense_perplexity=dense)
        print(rows[-1], flush=True)

    load_before = os.getloadavg()[0]
    report = train_routers(
        model,
        calib,
        RouterConfig(
            router="mlp",
            hidden=args.hidden,
            loss=args.loss,
            epochs=args.epochs,
            tokens_per_layer=args.calib_tokens,
            rounds=args.rounds,
        ),
        progress=True,
    )
    print(
        f"trained {len(report.layers)} mlp routers ({args.loss}) on {report.n_tokens} tokens in "
        f"{report.seconds:.0f} s with {args.threads} threads (load average {load_before:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after); mean held-out recall@25% "
        f"{report.mean_recall:.3f}, norm share {report.mean_norm_share:.3f}, router/saved FLOPs "
        f"{100 * report.router_cost_share:.1f} %",
        flush=True,
    )
    print_table("per-layer router report (every 5th layer)", report.rows()[::5])
    rows += route_quality(model, evaluation, keep=keep, taus=taus, dense_perplexity=dense)

    oracle = {(r["rule"], r["level"]): r["perplexity"] for r in rows if "oracle" in r["method"]}
    shown = []
    for r in rows:
        vs_oracle = oracle.get((r["rule"], r["level"]))
        shown.append(
            {
                "method": r["method"],
                "active %": 100 * r["active_fraction"],
                "FFN FLOPs %": 100 * r["ffn_flops_ratio"],
                "perplexity": r["perplexity"],
                "x dense": r["ppl_ratio"],
                "x oracle": r["perplexity"] / vs_oracle if vs_oracle else float("nan"),
            }
        )
    print_table(
        f"{args.moe or args.model}, dense ppl {dense:.3f}, {evaluation.n_tokens} eval tokens, "
        f"router/saved FLOPs {100 * report.router_cost_share:.1f} %",
        shown,
    )
    if args.results:
        from moefy.results import add_rows

        name = args.moe or args.model
        add_rows(args.results, [{**r, "family": FAMILY, "model": name} for r in rows])


if __name__ == "__main__":
    main()
