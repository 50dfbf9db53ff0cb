"""Closed-form routers (analytic, lstsq) against the oracle and the centroid router.

SmolLM2-135M is moefied into 8-neuron experts (``MoEfyConfig(expert_size=8, method="params")``,
192 experts per layer); each router is fitted on BBC News calibration tokens (no training) and
the model's perplexity on held-out BBC News text is measured at each top-k share kept, with the
FFN FLOPs share (routers included) measured by :func:`moefy.evaluate` against the dense model.

Run: .venv/bin/python benchmarks/closed_form_routers.py [--calibration-tokens 4096]
     [--eval-tokens 2048] [--keep 0.5,0.25] [--device cpu]
     [--routers oracle,analytic1,analytic2,analytic4,lstsq,centroid]
"""

from __future__ import annotations

import argparse
import copy
import time

from moefy import evaluate, load_model, load_text
from moefy.eval import EvalConfig
from moefy.moe import MoEfyConfig, OracleSelector, moe_layers, moefy_
from moefy.routing import RouterConfig, set_routing, train_routers

# benchmark name -> RouterConfig settings (None: the oracle, nothing to fit)
ROUTER_SETTINGS = {
    "oracle": None,
    "analytic1": {"router": "analytic", "representatives": 1},
    "analytic2": {"router": "analytic", "representatives": 2},
    "analytic4": {"router": "analytic", "representatives": 4},
    "lstsq": {"router": "lstsq"},
    "centroid": {"router": "centroid"},
}


def _routed(moe_model, name: str, calibration, tokens: int):
    """A copy of the moefied model with the router ``name``; fit seconds and mean recall."""
    model = copy.deepcopy(moe_model)
    settings = ROUTER_SETTINGS[name]
    if settings is None:
        for moe in moe_layers(model):
            moe.selector = OracleSelector(moe.num_experts)
        return model, 0.0, float("nan")
    start = time.perf_counter()
    report = train_routers(model, calibration, RouterConfig(tokens_per_layer=tokens, **settings))
    return model, time.perf_counter() - start, report.mean_recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--keep", default="0.5,0.25", help="top-k shares kept, comma-separated")
    parser.add_argument("--routers", default=",".join(ROUTER_SETTINGS), help="routers to compare")
    parser.add_argument("--device", default="cpu", help="device to run on")
    args = parser.parse_args()
    keeps = [float(v) for v in args.keep.split(",")]

    dense, tokenizer = load_model("smollm2-135m", device=args.device)
    text = load_text("bbc-news")
    calibration = text.blocks(tokenizer, split="calibration", n_tokens=args.calibration_tokens)
    evaluation = text.blocks(tokenizer, split="evaluation", n_tokens=args.eval_tokens)
    config = EvalConfig(tasks=("perplexity",), tokens=args.eval_tokens)
    base = evaluate(dense, config, blocks=evaluation)
    print(f"dense perplexity {base.lm.perplexity:.3f}", flush=True)
    moe_model = copy.deepcopy(dense)
    moefy_(moe_model, MoEfyConfig(expert_size=8, method="params"))
    del dense
    print("router     keep  FFN FLOPs  perplexity  x dense  holdout recall@25%  fit s")
    for name in args.routers.split(","):
        model, seconds, recall = _routed(moe_model, name, calibration, args.calibration_tokens)
        for keep in keeps:
            set_routing(model, "topk", keep=keep)
            result = evaluate(model, config, blocks=evaluation)
            flops = result.cost.ffn_flops_per_token / base.cost.ffn_flops_per_token
            ratio = result.lm.perplexity / base.lm.perplexity
            print(
                f"{name:9s}  {keep:4.2f}  {flops:9.1%}  {result.lm.perplexity:10.3f}  "
                f"{ratio:7.3f}  {recall:18.3f}  {seconds:5.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
