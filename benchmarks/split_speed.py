"""How long the split methods take on a LLaMA-7B-sized FFN: d_ff=11008, D=4096 -> 128 experts.

Goal: the ``params`` split under 20 s on 2 cores. Weights are synthetic (no model of
that size ships offline): Gaussian rows (where k-means settles at once) and rows drawn around 128
directions with heavy noise (where it has to work). The ``coactivation`` split runs on a
synthetic 11008 x 11008 count matrix from grouped random activations (about 1 GB as int64).

Run: .venv/bin/python benchmarks/split_speed.py [--skip-coactivation] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from moefy.arch import FFNWeights
from moefy.moe import MoEfyConfig
from moefy.moe.split import SplitRequest, split_neurons

D_MODEL, D_FF, EXPERTS = 4096, 11008, 128
GOAL_SECONDS = 20.0
# Synthetic structure: rows scatter around one of EXPERTS directions; this noise-to-signal
# ratio per coordinate leaves clusters that k-means must iterate to find.
ROW_NOISE = 3.0
COACT_TOKENS = 2048
COACT_GROUPS = 128
P_IN_GROUP, P_OUT_OF_GROUP = 0.5, 0.05


def _gated_weights(clustered: bool, seed: int) -> FFNWeights:
    gen = torch.Generator().manual_seed(seed)

    def rows() -> torch.Tensor:
        noise = torch.randn(D_FF, D_MODEL, generator=gen)
        if not clustered:
            return noise
        centers = torch.randn(EXPERTS, D_MODEL, generator=gen)
        group = torch.randint(EXPERTS, (D_FF,), generator=gen)
        return centers[group] + ROW_NOISE * noise

    return FFNWeights(w_up=rows(), w_down=torch.zeros(D_MODEL, D_FF), act=nn.SiLU(), w_gate=rows())


def _coactivation(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    group = torch.randint(COACT_GROUPS, (D_FF,), generator=gen)  # (F,)
    topic = torch.randint(COACT_GROUPS, (COACT_TOKENS,), generator=gen)  # (T,)
    p = torch.where(group[None, :] == topic[:, None], P_IN_GROUP, P_OUT_OF_GROUP)  # (T, F)
    active = (torch.rand(COACT_TOKENS, D_FF, generator=gen) < p).float()
    return (active.T @ active).long()  # (F, F)


def _time_split(method: str, weights: FFNWeights, coactivation: torch.Tensor | None) -> float:
    layout = MoEfyConfig(num_experts=EXPERTS).layout(D_FF)
    request = SplitRequest(weights=weights, layout=layout, seed=0, coactivation=coactivation)
    start = time.perf_counter()
    slots = split_neurons(method, request)
    seconds = time.perf_counter() - start
    assert slots.shape == (EXPERTS, D_FF // EXPERTS)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-coactivation", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"d_ff={D_FF}, d_model={D_MODEL}, {EXPERTS} experts, {torch.get_num_threads()} threads")
    print(f"{'method':<14} {'input':<34} {'seconds':>8}")
    for clustered in (False, True):
        weights = _gated_weights(clustered, seed=0)
        label = "gated, clustered rows" if clustered else "gated, Gaussian rows"
        seconds = _time_split("params", weights, None)
        verdict = "ok" if seconds < GOAL_SECONDS else f"over the {GOAL_SECONDS:.0f} s goal"
        print(f"{'params':<14} {label:<34} {seconds:8.1f}  {verdict}")
        del weights
    if not args.skip_coactivation:
        coactivation = _coactivation(seed=0)
        weights = _gated_weights(False, seed=0)
        seconds = _time_split("coactivation", weights, coactivation)
        print(f"{'coactivation':<14} {'11008^2 grouped co-activation':<34} {seconds:8.1f}")


if __name__ == "__main__":
    main()
