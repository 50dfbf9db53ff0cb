"""The exported router's logit spread against what it costs: quality and robustness of the top-k.

Qwen2-MoE picks its experts by the same softmax probabilities it weights them by, so the export
trades the two (docs/export.md): a small spread keeps every weight near the 1/E_r folded into
the experts, but leaves the top-k boundary within a few float32 steps, where another engine's
rounding picks other experts. For each spread this measures, on a moefied model at one share:

- ``recall`` and ``weight_error``: the router fit's (held-out) numbers;
- ``ratio``: the export's perplexity over moefy's own routed model, same evaluation tokens;
- ``ratio_mean_folded``: the same with each expert's mean weight when chosen (on the
  calibration tokens) divided out of its down projection (an idea that does not settle it);
- ``fragile``: share of (token, layer) choices whose k-th and (k+1)-th probabilities are within
  4 float32 ulps of each other;
- ``float64_agrees``: of the 5 serving prompts (``serving/reference.py``), how many give the
  same 32 greedy tokens when the (mean-folded) export runs in float64 as in float32 in
  transformers (the router's softmax in float32 both times): an engine-free proxy for what
  vLLM and llama.cpp see.

    python benchmarks/export_spread.py --model runs/carved --keep 0.25 --spreads 1e-3,1e-2,0.1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from moefy.data.text import load_text
from moefy.eval.perplexity import perplexity
from moefy.export.qwen2_moe import build_qwen2_moe, plan_export
from moefy.export.routing import fit_routers
from moefy.models.load import load_model
from moefy.routing import set_routing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from reference import PROMPTS  # noqa: E402

FRAGILE_ULPS = 4


def _router_pass(qwen, input_ids: torch.Tensor, k: int, batch_size: int = 8):
    """Per layer: sums and counts of E_r p_e over the chosen experts; the fragile share."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}
    fragile = [0, 0]
    handles = []
    for index, layer in enumerate(qwen.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue

        def hook(module, args, out, index=index):
            x = args[0].reshape(-1, args[0].shape[-1])  # (N, D)
            probs = torch.softmax((x @ module.weight.t()).float(), dim=-1)  # (N, E_r)
            E = probs.shape[1]
            top, chosen = probs.topk(k + 1, dim=-1)  # (N, k + 1)
            ulp = torch.finfo(torch.float32).eps * top[:, k - 1]
            fragile[0] += int((top[:, k - 1] - top[:, k] <= FRAGILE_ULPS * ulp).sum())
            fragile[1] += x.shape[0]
            ids = chosen[:, :k].reshape(-1)
            s = sums.setdefault(index, torch.zeros(E, dtype=torch.float64))
            s.index_add_(0, ids, (top[:, :k] * E).double().reshape(-1))
            c = counts.setdefault(index, torch.zeros(E, dtype=torch.float64))
            c.index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.float64))

        handles.append(gate.register_forward_hook(hook))
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            qwen(input_ids=input_ids[start : start + batch_size])
    for handle in handles:
        handle.remove()
    return sums, counts, fragile[0] / max(fragile[1], 1)


def _greedy(qwen, tokenizer, dtype: torch.dtype) -> list[list[int]]:
    qwen.to(dtype)
    runs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = qwen.generate(ids, max_new_tokens=32, do_sample=False)
        runs.append(out[0, ids.shape[1] :].tolist())
    qwen.float()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/carved", help="a moefied model folder")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--spreads", default="1e-3,1e-2,3e-2,0.1")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--out", help="JSON lines file for the rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype="fp32", device="cpu")
    set_routing(model, "topk", keep=args.keep)
    text = load_text("bbc-news")
    calibration = text.blocks(tokenizer, "calibration", 256, args.tokens)
    evaluation = text.blocks(tokenizer, "evaluation", 256, args.eval_tokens)
    ours = perplexity(model, evaluation, batch_size=8).perplexity
    plan = plan_export(model)
    k = plan.experts_per_token
    print(f"moefy's routed model: perplexity {ours:.3f}, {k} of {plan.num_experts} routed experts")
    for spread in (float(s) for s in args.spreads.split(",")):
        start = time.perf_counter()
        fit = fit_routers(model, plan, calibration, logit_spread=spread)
        qwen = build_qwen2_moe(model, plan, fit.weights()).eval()
        ratio = perplexity(qwen, evaluation, batch_size=8).perplexity / ours
        sums, counts, _ = _router_pass(qwen, calibration.input_ids, k)
        for index, layer in enumerate(qwen.model.layers):
            if index in sums:
                mean = (sums[index] / counts[index].clamp_min(1)).float()
                mean[counts[index] == 0] = 1.0
                layer.mlp.experts.down_proj.data /= mean[:, None, None]
        folded = perplexity(qwen, evaluation, batch_size=8).perplexity / ours
        _, _, fragile = _router_pass(qwen, evaluation.input_ids, k)
        qwen.set_experts_implementation("eager")  # grouped_mm has no float64
        reference = _greedy(qwen, tokenizer, torch.float32)
        other = _greedy(qwen, tokenizer, torch.float64)
        agree = sum(a == b for a, b in zip(reference, other, strict=True))
        row = {
            "keep": args.keep,
            "spread": spread,
            "recall": round(fit.mean_recall, 4),
            "weight_error": fit.mean_weight_error,
            "ratio": round(ratio, 4),
            "ratio_mean_folded": round(folded, 4),
            "fragile": round(fragile, 5),
            "float64_agrees": agree,
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as out:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
