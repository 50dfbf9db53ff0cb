"""How close cheap routers come to the oracle on a carved MoE: the share of the oracle's expert
norm each captures, on held-out calibration tokens.

SmolLM2-135M is carved (:func:`moefy.carve.carve_`: 8-neuron experts, 12.5 % shared,
``activation`` split). For a sample of layers, the inputs of each MoE layer are collected on
BBC News calibration text (:func:`moefy.moe.budget.collect_layer_inputs`: every expert running,
the attention-sink positions left out) and split 3:1 into fitting and held-out tokens. Each
router picks the routed experts of ``keep`` of the layer (shared ones run anyway); the figure is
the sum of the true output norms of its picks over the oracle's, averaged over held-out tokens.
Routers:
``lstsq`` (ridge fit of the norms), ``lstsq-sq`` (of the squared norms), ``pcaR`` (every
neuron's activation computed from the input projected on its R leading principal components,
summed per expert: a low-rank analytic router), ``analyticR`` (R representative neurons per
expert, the best correlated with the expert norm) and random.

Run: .venv/bin/python benchmarks/router_capture.py [--tokens 4096] [--keep 0.5]
     [--layers 0,5,10,15,20,25,29]
"""

from __future__ import annotations

import argparse

import torch

from moefy import load_model, load_text
from moefy.carve import CarveConfig, carve_
from moefy.moe import moe_layers
from moefy.moe.budget import collect_layer_inputs


def ridge(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Ridge solution of ``features @ W = targets`` (lambda 1e-3 of the mean diagonal)."""
    gram = features.T @ features
    lam = 1e-3 * gram.diagonal().mean()
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0]), features.T @ targets)


def router_scores(moe, x: torch.Tensor, norms: torch.Tensor, fit: slice) -> dict:
    """(N, E_r) scores of every router for the layer's routed experts."""
    ns, S = moe.num_shared, moe.expert_size
    n, routed = x.shape[0], moe.num_experts - ns
    ones = torch.ones(n, 1)
    xa = torch.cat([x, ones], 1)
    scores = {
        "lstsq": xa @ ridge(xa[fit], norms[fit]),
        "lstsq-sq": xa @ ridge(xa[fit], norms[fit].square()),
        "random": torch.rand(n, routed, generator=torch.Generator().manual_seed(0)),
    }
    gate = moe.w_in[ns:, :S].reshape(-1, x.shape[1]).float()  # (E_r*S, D)
    up = moe.w_in[ns:, S:].reshape(-1, x.shape[1]).float()
    down_norms = moe.w_out[ns:].reshape(-1, x.shape[1]).float().norm(dim=1)  # (E_r*S,)
    mean = x[fit].mean(0)
    _, vectors = torch.linalg.eigh((x[fit] - mean).T @ (x[fit] - mean))
    for rank in (32, 64, 128):
        basis = vectors[:, -rank:]  # (D, rank)
        projected = (x - mean) @ basis @ basis.T + mean
        h = moe.act(projected @ gate.T) * (projected @ up.T)
        scores[f"pca{rank}"] = (h.abs() * down_norms).reshape(n, routed, S).sum(-1)
    contrib = ((moe.act(x @ gate.T) * (x @ up.T)).abs() * down_norms).reshape(n, routed, S)
    centred_norms = norms[fit] - norms[fit].mean(0)
    centred = contrib[fit] - contrib[fit].mean(0)
    corr = (centred * centred_norms[:, :, None]).sum(0) / (
        centred.norm(dim=0) * centred_norms.norm(dim=0)[:, None] + 1e-9
    )
    for reps in (1, 2, 4):
        best = corr.topk(reps, dim=1).indices  # (E_r, reps)
        scores[f"analytic{reps}"] = contrib.gather(2, best[None].expand(n, -1, -1)).sum(-1)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--layers", default="0,5,10,15,20,25,29")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    blocks = load_text("bbc-news").blocks(tokenizer, split="calibration", n_tokens=args.tokens)
    carve_(model, blocks, CarveConfig(router="oracle"))
    layers = moe_layers(model)
    picked = [int(i) for i in args.layers.split(",")]
    collected = collect_layer_inputs(model, blocks, tokens_per_layer=args.tokens)
    inputs = [collected[i].float() for i in picked]
    totals: dict[str, list[float]] = {}
    for index, x in zip(picked, inputs, strict=True):
        moe = layers[index]
        with torch.no_grad():
            norms = moe.expert_norms(x)[:, moe.num_shared :]  # (N, E_r)
            k = max(1, round(args.keep * moe.num_experts) - moe.num_shared)
            n = x.shape[0]
            fit, held = slice(0, 3 * n // 4), slice(3 * n // 4, n)
            best = norms[held].topk(k, dim=1).values.sum(1)
            row = {}
            for name, score in router_scores(moe, x, norms, fit).items():
                picks = score[held].topk(k, dim=1).indices
                row[name] = float((norms[held].gather(1, picks).sum(1) / best).mean())
                totals.setdefault(name, []).append(row[name])
        print(index, " ".join(f"{name} {value:.3f}" for name, value in row.items()), flush=True)
    print("mean", " ".join(f"{name} {sum(v) / len(v):.3f}" for name, v in totals.items()))


if __name__ == "__main__":
    main()
