"""How much of a carved MoE's loss is the expert granularity: oracle selection at several expert
sizes against a neuron-level oracle, at the same share of the FFN.

SmolLM2-135M is carved (:func:`moefy.carve.carve_`, 12.5 % shared experts, ``activation`` split,
oracle selector) at each expert size; each token then runs ``keep`` of the experts with the
largest true output norms. The neuron-level oracle keeps each token's ``keep`` share of neurons
with the largest contribution ``|h_j| * ||W_down[:, j]||`` (a mask on the dense FFN: a bound,
not a speed-up). Prints perplexity on held-out BBC News text against the dense model.

Run: .venv/bin/python benchmarks/carve_granularity.py [--sizes 4,8,16] [--keep 0.5,0.25]
     [--calibration-tokens 4096] [--eval-tokens 2048]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from moefy import evaluate, load_model, load_text, set_selection
from moefy.arch import find_ffns
from moefy.carve import CarveConfig, carve_
from moefy.eval import EvalConfig


def neuron_oracle(model: torch.nn.Module, keep: float) -> list:
    """Hooks that keep each token's ``keep`` share of neurons by contribution (a mask)."""
    hooks = []
    for site in find_ffns(model):
        down = site.module.down_proj
        norms = down.weight.detach().norm(dim=0)  # (F,)

        def mask_input(module, args, norms=norms):
            h = args[0]  # (..., F)
            k = max(1, int(keep * h.shape[-1]))
            top = (h.abs() * norms).topk(k, dim=-1).indices
            return (h * torch.zeros_like(h).scatter_(-1, top, 1.0),)

        hooks.append(down.register_forward_pre_hook(mask_input))
    return hooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,8,16", help="expert sizes, comma-separated")
    parser.add_argument("--keep", default="0.5,0.25", help="kept shares, comma-separated")
    parser.add_argument("--shared", type=float, default=0.125)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    args = parser.parse_args()
    keeps = [float(k) for k in args.keep.split(",")]
    dense, tokenizer = load_model("smollm2-135m")
    text = load_text("bbc-news")
    calibration = text.blocks(tokenizer, split="calibration", n_tokens=args.calibration_tokens)
    evaluation = text.blocks(tokenizer, split="evaluation", n_tokens=args.eval_tokens)
    config = EvalConfig(tasks=("perplexity",), tokens=args.eval_tokens)
    base = evaluate(dense, config, blocks=evaluation).lm.perplexity
    print(f"dense perplexity {base:.3f}", flush=True)
    print("experts        keep  perplexity  x dense  carve s")
    for keep in keeps:
        hooks = neuron_oracle(dense, keep)
        ppl = evaluate(dense, config, blocks=evaluation).lm.perplexity
        for hook in hooks:
            hook.remove()
        print(f"{'neuron oracle':13s}  {keep:4.2f}  {ppl:10.3f}  {ppl / base:7.3f}", flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        carve_(
            model,
            calibration,
            CarveConfig(expert_size=size, shared=args.shared, router="oracle"),
        )
        seconds = time.perf_counter() - start
        for keep in keeps:
            set_selection(model, keep=keep)
            ppl = evaluate(model, config, blocks=evaluation).lm.perplexity
            name = f"S={size} oracle"
            print(
                f"{name:13s}  {keep:4.2f}  {ppl:10.3f}  {ppl / base:7.3f}  {seconds:7.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
