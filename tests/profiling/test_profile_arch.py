"""The profiler on every supported architecture, and its hooks."""

from __future__ import annotations

import pytest
import torch

from moefy.arch import find_ffns
from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.profiling import ProfileConfig, model_fingerprint, profile
from tiny_models import ARCH_NAMES, VOCAB, tiny_model

RELU_ARCHS = ("opt", "t5")


def _blocks(num_blocks: int = 3, block_len: int = 8) -> TokenBlocks:
    gen = torch.Generator().manual_seed(0)
    return TokenBlocks(torch.randint(3, VOCAB, (num_blocks, block_len), generator=gen))


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_architecture(arch: str) -> None:
    model = tiny_model(arch)
    blocks = _blocks()
    result = profile(model, blocks, ProfileConfig(batch_size=2, chunk_sizes=(1, 4)))
    sites = find_ffns(model)
    expected_layers = 4 if arch.startswith("t5") else 2  # T5: encoder + decoder stacks
    assert result.num_layers == len(sites) == expected_layers
    assert result.fingerprint == model_fingerprint(model)
    assert result.fingerprint["num_layers"] == expected_layers
    assert result.fingerprint["d_ff"] == [64] * expected_layers
    assert result.fingerprint["d_model"] == 32
    for layer, site in zip(result.layers, sites, strict=True):
        assert layer.name == site.name
        assert layer.tokens == blocks.n_tokens
        assert layer.rms > 0
        fractions = [
            layer.exact_zero_fraction,
            layer.active_fraction,
            layer.hot_fraction,
            *layer.below_rms_fraction.values(),
            *layer.contribution_fraction.values(),
            *layer.chunk_union_fraction.values(),
        ]
        assert all(0.0 <= f <= 1.0 for f in fractions)
        shares = list(layer.contribution_fraction.values())
        assert shares == sorted(shares) and 0 < shares[0] < shares[-1] < 1
        below = list(layer.below_rms_fraction.values())
        assert below == sorted(below)
        # contribution rule at 0.9: the mean active fraction is the 0.9-share fraction
        assert layer.active_fraction == pytest.approx(layer.contribution_fraction[0.9])
        assert layer.chunk_union_fraction[1] == pytest.approx(layer.active_fraction)
        assert layer.chunk_union_fraction[4] >= layer.chunk_union_fraction[1]
        assert float(result.active_count_histogram(layer.index).sum()) == blocks.n_tokens
    zeros = [layer.exact_zero_fraction for layer in result.layers]
    if arch in RELU_ARCHS:
        assert max(zeros) > 0.2
    else:
        assert max(zeros) < 0.01
    assert _hook_count(model) == 0


def test_hooks_removed_after_an_exception_mid_forward() -> None:
    model = tiny_model("llama").train()
    sites = find_ffns(model)

    def explode(module, args, output):
        raise RuntimeError("boom in layer 1")

    bomb = sites[1].input_module.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        profile(model, _blocks(), ProfileConfig(batch_size=2))
    bomb.remove()
    assert _hook_count(model) == 0
    assert model.training  # the training flag is restored too
    # and the model profiles normally afterwards, with the same result as a fresh model
    again = profile(model, _blocks(), ProfileConfig(batch_size=2))
    fresh = profile(tiny_model("llama"), _blocks(), ProfileConfig(batch_size=2))
    assert again.layers == fresh.layers


def test_bad_arguments() -> None:
    model = tiny_model("gpt2")
    with pytest.raises(MoefyError, match="TokenBlocks"):
        profile(model, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(MoefyError, match="ProfileConfig"):
        profile(model, _blocks(), {"batch_size": 2})


def test_blocks_shorter_than_a_chunk() -> None:
    result = profile(tiny_model("gpt2"), _blocks(block_len=6), ProfileConfig(chunk_sizes=(2, 8)))
    for layer in result.layers:
        assert layer.chunk_union_fraction[8] is None
        assert layer.chunk_union_fraction[2] is not None
    assert all(row["chunk8 union %"] == "-" for row in result.table_rows())


def test_batching_does_not_change_the_counts() -> None:
    model = tiny_model("opt")
    config = dict(active_rule="nonzero", coactivation=True)
    one = profile(model, _blocks(5), ProfileConfig(batch_size=1, **config))
    all_at_once = profile(model, _blocks(5), ProfileConfig(batch_size=5, **config))
    for i in range(one.num_layers):
        for name in (
            "tokens",
            "exact_zeros",
            "firing_counts",
            "active_count_histogram",
            "chunk_union",
        ):
            torch.testing.assert_close(one.sums(i)[name], all_at_once.sums(i)[name], atol=0, rtol=0)
        torch.testing.assert_close(one.coactivation(i), all_at_once.coactivation(i), atol=0, rtol=0)
