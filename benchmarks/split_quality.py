"""Which split makes the best experts: activation patterns, parameters, co-activation or random.

Shape legend: N tokens, F neurons, T pattern tokens, E experts, S neurons per expert.

Parts (``--part``, default all):
  quality     SmolLM2-135M on BBC News. Per layer, the 12.5 % of neurons with the highest
              activation rate (share of tokens where the neuron is among the token's top 10 % by
              contribution) are set aside as shared; the rest are split into experts of S = 8 / 16
              neurons by each method. Score: on held-out tokens, the share of the routed
              contribution mass (c = |h| * ||W_down column||) that each token's oracle top-k
              experts hold, at k = 50 % and 25 % of the routed experts (higher is better).
  assignment  the activation split's assignment step, exact (linear sum assignment on neurons x
              expert slots) vs Sinkhorn + greedy rounding: within-cluster mean cosine similarity of
              the centred patterns and CPU seconds, SmolLM2 layers (d_ff 1536, S = 8, 16, 32), and
              a Llama-3-8B-shaped random layer (14336 neurons, T 512, S 16) where one exact step is
              timed at growing sizes (it is cubic) instead of run to the end.
  scale       the activation split of the Llama-3-8B-shaped layer through ``split_neurons``:
              seconds against the 20 s goal.
The model and data come from the installed packages (nothing is downloaded).

Run: .venv/bin/python benchmarks/split_quality.py [--part quality] [--threads 2] [--layers 0,15]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from moefy import load_model, load_text
from moefy.arch import FFNWeights, find_ffns
from moefy.moe.layout import ExpertLayout
from moefy.moe.split import SplitRequest, split_neurons
from moefy.moe.split_patterns import (
    exact_balanced_assign,
    pattern_features,
    pattern_kmeans,
    within_cluster_similarity,
)

CALIBRATION_TOKENS, EVALUATION_TOKENS, PATTERN_TOKENS = 2048, 2048, 512
TOP_SHARE = 0.1  # a neuron is "top" for a token among its ceil(TOP_SHARE * F) largest
SHARED = 0.125
KEEPS = (0.5, 0.25)
QUALITY_SIZES = (8, 16)
QUALITY_METHODS = ("random", "params", "coactivation", "activation")
ASSIGNMENT_SIZES = (8, 16, 32)
ASSIGNMENT_SEEDS = (0, 1, 2)
LLAMA_D_MODEL, LLAMA_D_FF, LLAMA_EXPERT_SIZE = 4096, 14336, 16
EXACT_STEP_SIZES = (1536, 3072, 6144)
PROJECTED_DIM = 256  # the pattern projection the assignment part also tries
GOAL_SECONDS = 20.0
BATCH = 8


class LayerData:
    """One SmolLM2 layer: its weights and the contributions c (N, F) on both token sets."""

    def __init__(self, weights: FFNWeights, calibration: torch.Tensor, evaluation: torch.Tensor):
        self.weights = weights
        self.calibration = calibration  # (Nc, F)
        self.evaluation = evaluation  # (Ne, F)


def _ffn_inputs(model: nn.Module, sites: list, ids: torch.Tensor) -> list[torch.Tensor]:
    """(N, D) input of every FFN on the token blocks ``ids``."""
    inputs: list[list[torch.Tensor]] = [[] for _ in sites]

    def grab(index: int) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            inputs[index].append(args[0].detach().reshape(-1, args[0].shape[-1]))

        return hook

    handles = [site.input_module.register_forward_pre_hook(grab(i)) for i, site in enumerate(sites)]
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], BATCH):
                model(ids[start : start + BATCH])
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(chunks) for chunks in inputs]


def smollm2_layers(layers: list[int] | None) -> list[LayerData]:
    """Contributions of SmolLM2-135M's FFN neurons on BBC News calibration and evaluation tokens."""
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    text = load_text("bbc-news")
    calibration = text.blocks(tokenizer, split="calibration", n_tokens=CALIBRATION_TOKENS)
    evaluation = text.blocks(tokenizer, split="evaluation", n_tokens=EVALUATION_TOKENS)
    sites = find_ffns(model)
    chosen = layers if layers is not None else list(range(len(sites)))
    sites = [sites[i] for i in chosen]
    x_cal = _ffn_inputs(model, sites, calibration.input_ids)
    x_eval = _ffn_inputs(model, sites, evaluation.input_ids)
    data = []
    with torch.no_grad():
        for site, cal, ev in zip(sites, x_cal, x_eval, strict=True):
            weights = site.weights()
            norms = weights.neuron_norms()
            data.append(
                LayerData(
                    weights,
                    weights.hidden(cal).abs() * norms,
                    weights.hidden(ev).abs() * norms,
                )
            )
    return data


def contribution_patterns(contributions: torch.Tensor) -> torch.Tensor:
    """(F, T) share of each token's contribution, on PATTERN_TOKENS evenly spaced tokens."""
    sampled = torch.linspace(0, contributions.shape[0] - 1, PATTERN_TOKENS).round().long()
    shares = contributions[sampled]  # (T, F)
    return (shares / shares.sum(dim=1, keepdim=True).clamp_min(1e-30)).T.contiguous()


def _top_mask(contributions: torch.Tensor) -> torch.Tensor:
    """(N, F) bool: neuron among the token's top TOP_SHARE by contribution."""
    k = math.ceil(TOP_SHARE * contributions.shape[1])
    index = contributions.topk(k, dim=1).indices
    return torch.zeros_like(contributions, dtype=torch.bool).scatter_(1, index, True)


# --------------------------------------------------------------------------- quality


def _routed_request(layer: LayerData, size: int, seed: int) -> tuple[SplitRequest, torch.Tensor]:
    """The split request over the routed neurons (shared ones set aside) and their indices."""
    top = _top_mask(layer.calibration).float()  # (Nc, F)
    F = top.shape[1]
    num_shared = round(SHARED * F / size) * size
    routed = torch.argsort(top.mean(dim=0), descending=True)[num_shared:].sort().values
    w = layer.weights
    weights = FFNWeights(
        w_up=w.w_up[routed],
        w_down=w.w_down[:, routed],
        act=w.act,
        w_gate=None if w.w_gate is None else w.w_gate[routed],
    )
    E = routed.numel() // size
    layout = ExpertLayout(num_experts=E, expert_size=size, real_sizes=(size,) * E)
    request = SplitRequest(
        weights=weights,
        layout=layout,
        seed=seed,
        coactivation=(top[:, routed].T @ top[:, routed]).long(),  # (F', F')
        patterns=contribution_patterns(layer.calibration)[routed],  # (F', T)
    )
    return request, routed


def captured_mass(evaluation: torch.Tensor, slots: torch.Tensor, keep: float) -> float:
    """Share of the routed contribution mass held by each token's top-k experts (oracle).

    Args:
        evaluation: (N, F') contributions of the routed neurons.
        slots: (E, S) routed-neuron index per expert slot (no padding here).
        keep: share of the E experts each token keeps.
    """
    expert_mass = evaluation[:, slots].sum(dim=2)  # (N, E)
    k = max(1, round(keep * slots.shape[0]))
    return float(expert_mass.topk(k, dim=1).values.sum() / expert_mass.sum())


def run_quality(layers: list[LayerData]) -> None:
    print(f"\nquality: oracle top-k share of routed contribution mass, {len(layers)} layers,")
    print(f"{SHARED:.1%} shared set aside, {EVALUATION_TOKENS} held-out tokens (mean / min)")
    header = "  ".join(f"keep {keep:.0%} mean   min" for keep in KEEPS)
    print(f"{'S':>3} {'method':<13} {header}  {'split s':>8}")
    for size in QUALITY_SIZES:
        for method in QUALITY_METHODS:
            scores = {keep: [] for keep in KEEPS}
            seconds = 0.0
            for index, layer in enumerate(layers):
                request, routed = _routed_request(layer, size, seed=index)
                start = time.perf_counter()
                slots = split_neurons(method, request)  # (E, S)
                seconds += time.perf_counter() - start
                for keep in KEEPS:
                    scores[keep].append(captured_mass(layer.evaluation[:, routed], slots, keep))
            cells = "  ".join(
                f"{sum(v) / len(v):14.4f} {min(v):.4f}" for v in (scores[k] for k in KEEPS)
            )
            print(f"{size:>3} {method:<13} {cells}  {seconds / len(layers):8.2f}")


# --------------------------------------------------------------------------- assignment


def _objective_and_seconds(
    patterns: torch.Tensor, size: int, seed: int, assignment: str, dim: int | None
) -> tuple[float, float]:
    capacities = torch.full((patterns.shape[0] // size,), size)
    start = time.process_time()
    labels = pattern_kmeans(patterns, capacities, seed=seed, assignment=assignment, dim=dim)
    seconds = time.process_time() - start
    return within_cluster_similarity(pattern_features(patterns, dim=None), labels), seconds


def run_assignment(layers: list[LayerData], llama_patterns: torch.Tensor) -> None:
    variants = (("sinkhorn", None), ("exact", None), ("sinkhorn", PROJECTED_DIM))
    print(f"\nassignment step: within-cluster mean cosine / CPU s, mean of {len(layers)} layers")
    print(f"x {len(ASSIGNMENT_SEEDS)} seeds, d_ff 1536, T {PATTERN_TOKENS}")
    names = [assignment + ("" if dim is None else f" proj {dim}") for assignment, dim in variants]
    print(f"{'S':>3} " + "  ".join(f"{name:<22}" for name in names))
    patterns = [contribution_patterns(layer.calibration) for layer in layers]
    for size in ASSIGNMENT_SIZES:
        cells = []
        for assignment, dim in variants:
            runs = [
                _objective_and_seconds(p, size, seed, assignment, dim)
                for p in patterns
                for seed in ASSIGNMENT_SEEDS
            ]
            objective = sum(r[0] for r in runs) / len(runs)
            seconds = sum(r[1] for r in runs) / len(runs)
            cells.append(f"{objective:.4f} / {seconds:6.2f} s  ")
        print(f"{size:>3} " + "  ".join(cells))
    _llama_assignment(llama_patterns)


def _llama_assignment(patterns: torch.Tensor) -> None:
    objective, seconds = _objective_and_seconds(patterns, LLAMA_EXPERT_SIZE, 0, "sinkhorn", None)
    print(f"\nLlama-3-8B-shaped random layer ({LLAMA_D_FF} x T {patterns.shape[1]}, S 16)")
    print(f"sinkhorn: objective {objective:.4f}, {seconds:.1f} CPU s (whole split)")
    features = torch.nn.functional.normalize(pattern_features(patterns, dim=None), dim=1)
    generator = torch.Generator().manual_seed(0)
    timings = []
    for n in EXACT_STEP_SIZES:
        rows = features[:n]
        E = n // LLAMA_EXPERT_SIZE
        centroids = rows[torch.randperm(n, generator=generator)[:E]]  # (E, K)
        start = time.process_time()
        exact_balanced_assign(rows @ centroids.T, torch.full((E,), LLAMA_EXPERT_SIZE))
        timings.append(time.process_time() - start)
        print(f"exact: one assignment step at {n} neurons: {timings[-1]:.1f} CPU s")
    # power law through the two largest sizes, extrapolated to the full layer
    ratio = EXACT_STEP_SIZES[-1] / EXACT_STEP_SIZES[-2]
    power = math.log(max(timings[-1], 1e-3) / max(timings[-2], 1e-3)) / math.log(ratio)
    bound = timings[-1] * (LLAMA_D_FF / EXACT_STEP_SIZES[-1]) ** max(power, 2.0)
    cost_gb = LLAMA_D_FF**2 * 8 / 1e9
    print(
        f"exact at {LLAMA_D_FF}: about {bound:.0f} CPU s per step (power {max(power, 2.0):.1f}), "
        f"a {cost_gb:.1f} GB cost matrix"
    )


# --------------------------------------------------------------------------- scale


def llama_patterns(seed: int = 0) -> tuple[torch.Tensor, FFNWeights]:
    """(F, T) patterns of a random Llama-3-8B-shaped gated FFN on Gaussian inputs, its weights."""
    gen = torch.Generator().manual_seed(seed)
    D, F = LLAMA_D_MODEL, LLAMA_D_FF
    weights = FFNWeights(
        w_up=torch.randn(F, D, generator=gen) / D**0.5,
        w_down=torch.randn(D, F, generator=gen) / F**0.5,
        act=nn.SiLU(),
        w_gate=torch.randn(F, D, generator=gen) / D**0.5,
    )
    x = torch.randn(PATTERN_TOKENS, D, generator=gen)  # (T, D)
    with torch.no_grad():
        contributions = weights.hidden(x).abs() * weights.neuron_norms()  # (T, F)
    return contribution_patterns(contributions), weights


def run_scale(patterns: torch.Tensor, weights: FFNWeights) -> None:
    E = LLAMA_D_FF // LLAMA_EXPERT_SIZE
    layout = ExpertLayout(num_experts=E, expert_size=LLAMA_EXPERT_SIZE, real_sizes=(16,) * E)
    request = SplitRequest(weights=weights, layout=layout, seed=0, patterns=patterns)
    wall, cpu = time.perf_counter(), time.process_time()
    slots = split_neurons("activation", request)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert slots.shape == (E, LLAMA_EXPERT_SIZE)
    verdict = "ok" if wall < GOAL_SECONDS else f"over the {GOAL_SECONDS:.0f} s goal"
    print(f"\nscale: activation split of {LLAMA_D_FF} neurons into {E} x {LLAMA_EXPERT_SIZE}, ")
    print(f"{torch.get_num_threads()} threads: {wall:.1f} s wall, {cpu:.1f} CPU s  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("quality", "assignment", "scale"), action="append")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--layers", default=None, help="SmolLM2 layers, e.g. 0,15,29 (all)")
    args = parser.parse_args()
    parts = args.part or ["quality", "assignment", "scale"]
    torch.set_num_threads(args.threads)
    layers = [int(i) for i in args.layers.split(",")] if args.layers else None
    smollm2 = smollm2_layers(layers) if {"quality", "assignment"} & set(parts) else []
    llama = llama_patterns() if {"assignment", "scale"} & set(parts) else None
    if "quality" in parts:
        run_quality(smollm2)
    if "assignment" in parts:
        assert llama is not None
        run_assignment(smollm2, llama[0])
    if "scale" in parts:
        assert llama is not None
        run_scale(*llama)


if __name__ == "__main__":
    main()
