"""Profiler statistics against a brute-force computation with explicit loops over tokens.

Shape legend:
    N: tokens, T: tokens per block, F: FFN width
"""

from __future__ import annotations

import math

import pytest
import torch

from moefy.arch import find_ffns
from moefy.data.blocks import TokenBlocks
from moefy.profiling import ProfileConfig, profile
from moefy.profiling.accumulators import ABS_HISTOGRAM_SHIFT, LayerAccumulator
from moefy.profiling.result import SparsityProfile
from tiny_models import VOCAB, tiny_model

HIST_RELATIVE_WIDTH = 2.0 ** -(23 - ABS_HISTOGRAM_SHIFT)  # 1/128
CHUNKS = (1, 2, 3, 4, 6, 8, 16, 32)  # 3 and 6 do not tile T=16; 32 is longer than a block


def _blocks(num_blocks: int = 6, block_len: int = 16, seed: int = 0) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    return TokenBlocks(torch.randint(3, VOCAB, (num_blocks, block_len), generator=gen))


def _reference_hidden(model, blocks: TokenBlocks, batch_size: int) -> list[torch.Tensor]:
    """h per layer as (num_blocks, T, F) float64, computed from the FFN input x with the
    canonical weights (a different path from the profiler's down-projection hook)."""
    sites = find_ffns(model)
    captured: list[list[torch.Tensor]] = [[] for _ in sites]
    handles = []
    for site, store in zip(sites, captured, strict=True):
        weights = site.weights()

        def hook(module, args, weights=weights, store=store):
            store.append(weights.hidden(args[0]).double())

        handles.append(site.input_module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for ids in blocks.batches(batch_size):
                kwargs = {"input_ids": ids}
                if model.config.is_encoder_decoder:
                    kwargs["decoder_input_ids"] = ids
                model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    T = blocks.block_len
    return [torch.cat([h.reshape(-1, T, h.shape[-1]) for h in store]) for store in captured]


def _smallest_set(c: torch.Tensor, p: float) -> list[int]:
    """Ids of the fewest neurons whose c sums to at least p * sum(c) (loop, float64)."""
    total = float(c.sum())
    if total == 0.0:
        return []
    chosen, mass = [], 0.0
    for i in sorted(range(len(c)), key=lambda i: -float(c[i])):
        if mass >= p * total:
            break
        chosen.append(i)
        mass += float(c[i])
    return chosen


def _brute_force(H: torch.Tensor, norms: torch.Tensor, config: ProfileConfig) -> dict:
    """All statistics of one layer from H (num_blocks, T, F) float64 with loops over tokens."""
    num_blocks, T, F = H.shape
    tokens = H.reshape(-1, F)
    N = tokens.shape[0]
    rms = math.sqrt(float((H**2).mean()))
    active_sets = []
    needed = {p: 0 for p in config.shares}
    curve = torch.zeros(F + 1, dtype=torch.float64)
    for h in tokens:
        c = h.abs() * norms
        for p in config.shares:
            needed[p] += len(_smallest_set(c, p))
        strongest = torch.sort(c, descending=True).values
        total = float(c.sum())
        for k in range(1, F + 1):
            curve[k] += float(strongest[:k].sum()) / total if total > 0 else 1.0
        if config.active_rule == "contribution":
            active_sets.append(set(_smallest_set(c, config.active_share)))
        elif config.active_rule == "nonzero":
            active_sets.append({i for i in range(F) if h[i] != 0})
        else:
            token_rms = math.sqrt(float((h**2).mean()))
            active_sets.append(
                {i for i in range(F) if abs(h[i]) > config.active_threshold * token_rms}
            )
    firing = torch.zeros(F, dtype=torch.float64)
    count_hist = torch.zeros(F + 1, dtype=torch.float64)
    coactivation = torch.zeros(F, F, dtype=torch.float64)
    for active in active_sets:
        count_hist[len(active)] += 1
        mask = torch.zeros(F, dtype=torch.float64)
        mask[list(active)] = 1.0
        firing += mask
        coactivation += torch.outer(mask, mask)
    chunk_union = {}
    for n in config.chunk_sizes:
        unions = []
        for b in range(num_blocks):
            for start in range(0, T - n + 1, n):
                union = set().union(*active_sets[b * T + start : b * T + start + n])
                unions.append(len(union) / F)
        chunk_union[n] = sum(unions) / len(unions) if unions else None
    hot_order = sorted(range(F), key=lambda i: (-float(firing[i]), i))
    mass, hot_count = 0.0, 0
    while mass < config.hot_share * float(firing.sum()):
        mass += float(firing[hot_order[hot_count]])
        hot_count += 1
    return {
        "rms": rms,
        "zero": float((H == 0).double().mean()),
        "abs": H.abs().flatten(),
        "contribution": {p: needed[p] / (N * F) for p in config.shares},
        "curve": curve / N,
        "active": sum(len(a) for a in active_sets) / (N * F),
        "firing": firing,
        "count_hist": count_hist,
        "coactivation": coactivation,
        "chunk_union": chunk_union,
        "hot_fraction": hot_count / F,
        "never": int((firing == 0).sum()),
        "hot_ids": tuple(i for i in hot_order[: config.num_hot] if firing[i] > 0),
    }


def _check_layer(result: SparsityProfile, i: int, ref: dict, config: ProfileConfig) -> None:
    layer = result.layers[i]
    N = layer.tokens
    F = layer.d_ff
    assert layer.rms == pytest.approx(ref["rms"], rel=1e-5)
    assert layer.exact_zero_fraction == pytest.approx(ref["zero"], abs=1e-12)
    for t in config.rms_thresholds:
        value = t * ref["rms"]
        # the one histogram bin holding the threshold spans at most 1/128 of its value
        low = float((ref["abs"] < value * (1 - 2 * HIST_RELATIVE_WIDTH)).double().mean())
        high = float((ref["abs"] < value * (1 + 2 * HIST_RELATIVE_WIDTH)).double().mean())
        assert low <= layer.below_rms_fraction[t] <= high, (
            t,
            low,
            layer.below_rms_fraction[t],
            high,
        )
    for p in config.shares:
        # fp32 sorting may move a token's cut-off by one neuron at an exact tie; allow two
        assert layer.contribution_fraction[p] == pytest.approx(
            ref["contribution"][p], abs=2 / (N * F)
        )
    torch.testing.assert_close(result.contribution_curve(i), ref["curve"], atol=1e-5, rtol=0)
    assert layer.active_fraction == pytest.approx(ref["active"], abs=1e-12)
    torch.testing.assert_close(result.sums(i)["firing_counts"], ref["firing"], atol=0, rtol=0)
    torch.testing.assert_close(result.active_count_histogram(i), ref["count_hist"], atol=0, rtol=0)
    assert layer.chunk_union_fraction.keys() == ref["chunk_union"].keys()
    for n, expected in ref["chunk_union"].items():
        if expected is None:
            assert layer.chunk_union_fraction[n] is None
        else:
            assert layer.chunk_union_fraction[n] == pytest.approx(expected, abs=1e-12), n
    assert layer.hot_fraction == pytest.approx(ref["hot_fraction"], abs=1e-12)
    assert layer.never_active == ref["never"]
    assert layer.hot_neurons == ref["hot_ids"]
    if config.coactivation:
        torch.testing.assert_close(result.coactivation(i), ref["coactivation"], atol=0, rtol=0)


@pytest.mark.parametrize(
    ("arch", "rule"),
    [
        ("llama", "contribution"),
        ("llama", "magnitude"),
        ("opt", "nonzero"),
        ("opt", "contribution"),
    ],
)
def test_statistics_match_brute_force(arch: str, rule: str) -> None:
    model = tiny_model(arch)
    blocks = _blocks()
    config = ProfileConfig(
        batch_size=4,
        active_rule=rule,
        active_threshold=0.5,
        chunk_sizes=CHUNKS,
        coactivation=True,
        num_hot=8,
    )
    result = profile(model, blocks, config)
    hidden = _reference_hidden(model, blocks, batch_size=4)
    sites = find_ffns(model)
    assert result.num_layers == len(sites) == len(hidden)
    for i, (site, H) in enumerate(zip(sites, hidden, strict=True)):
        norms = site.weights().w_down.detach().double().norm(dim=0)
        _check_layer(result, i, _brute_force(H, norms, config), config)
    if arch == "opt":  # ReLU: the statistics are about real zeros
        assert all(layer.exact_zero_fraction > 0.2 for layer in result.layers)


def test_accumulator_edge_cases_match_brute_force() -> None:
    """F not a multiple of 8 (no packed OR), exact zeros, a token whose h is all zero."""
    B, T, F = 3, 5, 12
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(B, T, F, generator=gen, dtype=torch.float64).float()
    h[h.abs() < 0.4] = 0.0
    h[1, 2] = 0.0  # a token with no activation at all: no neuron needed, none active
    norms = torch.rand(F, generator=gen) + 0.5
    config = ProfileConfig(chunk_sizes=(1, 2, 3, 5, 6), coactivation=True, num_hot=4)
    accumulator = LayerAccumulator(norms, config)
    accumulator.update(h[:2])
    accumulator.update(h[2:])
    sums = accumulator.tensors()
    coactivation = sums.pop("coactivation")
    result = SparsityProfile(
        config=config,
        fingerprint={},
        layer_names=["x"],
        layer_sums=[sums],
        coactivation=[coactivation],
    )
    _check_layer(result, 0, _brute_force(h.double(), norms.double(), config), config)
    assert result.active_count_histogram(0)[0] >= 1  # the empty token


def test_accumulator_memory_is_independent_of_tokens() -> None:
    F = 16
    config = ProfileConfig(coactivation=True)
    norms = torch.ones(F)
    small, large = LayerAccumulator(norms, config), LayerAccumulator(norms, config)
    before = large.nbytes
    small.update(torch.randn(1, 4, F))
    for _ in range(20):
        large.update(torch.randn(8, 64, F))
    assert small.nbytes == large.nbytes == before
    P, C = len(config.shares), len(config.chunk_sizes)
    K = 1 << (31 - ABS_HISTOGRAM_SHIFT)
    rate_sums = 2 * F  # top_counts, contribution_share
    assert before == 8 * (3 + K + P + F + (F + 1) + F + 2 * C + rate_sums + F * F)
    assert all(t.dtype == torch.float64 for t in large.tensors().values())
    assert float(large.tensors()["tokens"]) == 20 * 8 * 64


def test_profile_arrays_do_not_grow_with_data() -> None:
    model = tiny_model("opt")
    short = profile(model, _blocks(num_blocks=2), ProfileConfig(batch_size=2))
    long = profile(model, _blocks(num_blocks=12), ProfileConfig(batch_size=2))
    assert short.n_tokens * 6 == long.n_tokens
    for i in range(short.num_layers):
        shapes = {k: v.shape for k, v in short.sums(i).items()}
        assert shapes == {k: v.shape for k, v in long.sums(i).items()}
