"""Activation rates, contribution shares and activation patterns: against plain torch, saved and
loaded, older folders, bad files, the config, the CLI and two gloo processes.

Shape legend:
    N: tokens, F: FFN width, S: sampled tokens of the patterns
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from gloo import spawn
from moefy.arch import find_ffns
from moefy.cli.main import main
from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.profiling import ProfileConfig, SparsityProfile, profile
from moefy.profiling.accumulators import top_thresholds
from moefy.profiling.patterns import (
    decode_patterns,
    encode_patterns,
    pattern_positions,
    top_count,
)
from moefy.profiling.storage import RATE_SUMS
from tiny_models import VOCAB, save_tiny_hf_folder, tiny_model, write_word_text

# float16 keeps 11 significant bits: a relative error of at most 2**-11 per stored share
FLOAT16_RTOL = 2.0**-10
CONFIG = ProfileConfig(batch_size=2, top_share=0.2, pattern_tokens=12)
# batch_size=1: every block runs alone with one or two processes, so h is bitwise the same
DIST_CONFIG = ProfileConfig(batch_size=1, top_share=0.2, pattern_tokens=12)


def _blocks(num_blocks: int = 5, block_len: int = 8, seed: int = 1) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    return TokenBlocks(torch.randint(3, VOCAB, (num_blocks, block_len), generator=gen))


def _hidden(model, blocks: TokenBlocks) -> list[torch.Tensor]:
    """(N, F) float32 h per layer, in token order, from the down projections' inputs."""
    sites = find_ffns(model)
    captured: list[list[torch.Tensor]] = [[] for _ in sites]
    handles = [
        site.output_module.register_forward_pre_hook(
            lambda module, args, store=store: store.append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for site, store in zip(sites, captured, strict=True)
    ]
    try:
        with torch.no_grad():
            for ids in blocks.batches(1):
                model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(store).float() for store in captured]


def _reference(model, blocks: TokenBlocks, config: ProfileConfig) -> list[dict]:
    """Rates, shares and patterns per layer, with topk and plain sums."""
    out = []
    for site, h in zip(find_ffns(model), _hidden(model, blocks), strict=True):
        magnitude = h.abs()  # (N, F)
        N, F = magnitude.shape
        k = math.ceil(round(config.top_share * F, 9))
        kth = torch.topk(magnitude, k, dim=1).values[:, -1:]  # (N, 1)
        top = (magnitude >= kth) & (magnitude > 0)  # (N, F)
        c = magnitude * site.weights().neuron_norms().float()  # (N, F)
        share = c / c.sum(1, keepdim=True)  # (N, F)
        positions = [int((j + 0.5) * N / min(config.pattern_tokens, N)) for j in range(N)]
        positions = positions[: min(config.pattern_tokens, N)]
        out.append(
            {
                "rate": top.double().mean(0).float(),
                "share": share.double().mean(0).float(),
                "patterns": share[positions].T,  # (F, S)
            }
        )
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def profiled(model) -> SparsityProfile:
    return profile(model, _blocks(), CONFIG)


def test_rates_shares_and_patterns_match_plain_torch(model, profiled) -> None:
    assert profiled.has_activation_rates and profiled.pattern_tokens == 12
    for i, ref in enumerate(_reference(model, _blocks(), CONFIG)):
        torch.testing.assert_close(profiled.activation_rate(i), ref["rate"], atol=1e-6, rtol=0)
        torch.testing.assert_close(profiled.contribution_share(i), ref["share"])
        assert float(profiled.contribution_share(i).sum()) == pytest.approx(1.0, abs=1e-5)
        patterns = profiled.activation_patterns(i)
        assert patterns.shape == (64, 12) and patterns.dtype == torch.float32
        torch.testing.assert_close(patterns, ref["patterns"], rtol=FLOAT16_RTOL, atol=1e-7)
        # k of F neurons are top for every token (no ties or zeros in a SiLU model)
        rate_sum = float(profiled.activation_rate(i).sum())
        assert rate_sum == pytest.approx(top_count(0.2, 64), abs=1e-4)


def test_zero_activations_are_never_top() -> None:
    model = tiny_model("opt")  # ReLU: many h are exactly 0
    config = ProfileConfig(batch_size=3, top_share=1.0, pattern_tokens=4)
    result = profile(model, _blocks(), config)
    for i, h in enumerate(_hidden(model, _blocks())):
        expected = (h != 0).double().mean(0).float()  # top_share 1: every non-zero neuron
        torch.testing.assert_close(result.activation_rate(i), expected, atol=1e-6, rtol=0)
    assert float(expected.mean()) < 0.9  # the case is not vacuous


def test_patterns_do_not_depend_on_batching(model, profiled) -> None:
    one_by_one = profile(model, _blocks(), DIST_CONFIG)
    for i in range(profiled.num_layers):
        torch.testing.assert_close(
            one_by_one.activation_patterns(i),
            profiled.activation_patterns(i),
            rtol=2 * FLOAT16_RTOL,
            atol=1e-7,
        )


def test_pattern_positions_and_counts() -> None:
    assert pattern_positions(10, 4).tolist() == [1, 3, 6, 8]
    assert pattern_positions(3, 5).tolist() == [0, 1, 2]  # fewer tokens than asked
    assert pattern_positions(100, 0) is None
    positions = pattern_positions(16384, 512)
    assert positions.numel() == 512 and bool((positions.diff() == 32).all())
    assert top_count(0.3, 10) == 3 and top_count(0.1, 1536) == 154
    assert top_count(1e-9, 64) == 1 and top_count(1.0, 64) == 64
    shares = torch.softmax(torch.randn(14336, 3), dim=0)  # (F, S): wide layer, small shares
    torch.testing.assert_close(
        decode_patterns(encode_patterns(shares)), shares, rtol=FLOAT16_RTOL, atol=0
    )


def test_top_thresholds_are_the_kth_largest() -> None:
    gen = torch.Generator().manual_seed(0)
    magnitude = torch.randn(37, 50, generator=gen).abs()  # (N, F), rows split over threads
    for k in (1, 7, 50):
        expected = torch.kthvalue(magnitude, 50 - k + 1, dim=1).values  # the GPU path
        torch.testing.assert_close(top_thresholds(magnitude, k), expected, rtol=0, atol=0)


def test_no_patterns_when_pattern_tokens_is_zero(model, tmp_path) -> None:
    result = profile(model, _blocks(), ProfileConfig(batch_size=4, pattern_tokens=0))
    assert result.has_activation_rates and result.pattern_tokens == 0
    with pytest.raises(MoefyError, match="--pattern-tokens"):
        result.activation_patterns(0)
    out = result.save(tmp_path / "p")
    assert not (out / "patterns.safetensors").exists()
    assert SparsityProfile.load(out).pattern_tokens == 0


def test_save_load_identical(profiled, tmp_path) -> None:
    loaded = SparsityProfile.load(profiled.save(tmp_path / "a"))
    again = SparsityProfile.load(loaded.save(tmp_path / "b"))  # patterns copied from disk
    assert loaded.layers == profiled.layers and loaded.config == profiled.config
    assert loaded.layers[0].frequent_rate is not None
    for other in (loaded, again):
        assert other.pattern_tokens == 12
        for i in range(profiled.num_layers):
            for name in ("activation_rate", "contribution_share", "activation_patterns"):
                ours, theirs = getattr(other, name)(i), getattr(profiled, name)(i)
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    with pytest.raises(MoefyError, match="out of range"):
        loaded.activation_patterns(2)


def _make_old(folder) -> None:
    """Turn a saved profile folder into one written before activation rates existed."""
    arrays = load_file(str(folder / "arrays.safetensors"))
    save_file(
        {k: v for k, v in arrays.items() if k.rsplit(".", 1)[-1] not in RATE_SUMS},
        str(folder / "arrays.safetensors"),
    )
    summary = json.loads((folder / "summary.json").read_text())
    summary["version"] = 1
    del summary["has_patterns"]
    for key in ("top_share", "pattern_tokens"):
        del summary["config"][key]
    summary["config"]["version"] = 1
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "patterns.safetensors").unlink()


def test_an_older_folder_loads_but_says_to_profile_again(profiled, tmp_path) -> None:
    folder = profiled.save(tmp_path / "old")
    _make_old(folder)
    old = SparsityProfile.load(folder)
    assert not old.has_activation_rates
    assert old.layers[0].active_fraction == profiled.layers[0].active_fraction
    assert old.table_rows()[0]["freq10 rate %"] == "-"
    for method in (old.activation_rate, old.contribution_share, old.activation_patterns):
        with pytest.raises(MoefyError, match="re-run moefy profile") as err:
            method(0)
        assert str(folder) in str(err.value) and "\n" not in str(err.value)


def _truncate_patterns(folder) -> None:
    path = folder / "patterns.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _reshape_patterns(folder) -> None:
    path = folder / "patterns.safetensors"
    stored = load_file(str(path))
    stored["layer.1"] = stored["layer.1"][:, :5].contiguous()  # other layers sample 12 tokens
    save_file(stored, str(path))


def _widen_patterns(folder) -> None:
    path = folder / "patterns.safetensors"
    stored = load_file(str(path))
    stored["layer.0"] = torch.zeros(65, 12, dtype=torch.float16)
    save_file(stored, str(path))


def _reshape_rates(folder) -> None:
    path = folder / "arrays.safetensors"
    arrays = load_file(str(path))
    arrays["layer.0.top_counts"] = torch.zeros(63, dtype=torch.float64)
    save_file(arrays, str(path))


def _drop_one_layer_rates(folder) -> None:
    path = folder / "arrays.safetensors"
    arrays = load_file(str(path))
    del arrays["layer.1.contribution_share"]
    save_file(arrays, str(path))


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        (lambda f: (f / "patterns.safetensors").unlink(), "patterns.safetensors"),
        (_truncate_patterns, "corrupt"),
        (_reshape_patterns, "different tokens"),
        (_widen_patterns, "expected float16"),
        (_reshape_rates, "top_counts"),
        (_drop_one_layer_rates, "some layers"),
    ],
    ids=["missing", "truncated", "uneven", "wrong-width", "rate-shape", "partial-rates"],
)
def test_damaged_folders_fail_in_one_line(profiled, tmp_path, damage, expect) -> None:
    folder = profiled.save(tmp_path / "p")
    damage(folder)
    with pytest.raises(MoefyError, match=expect) as err:
        SparsityProfile.load(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"top_share": 0},
        {"top_share": 1.5},
        {"top_share": float("nan")},
        {"top_share": True},
        {"pattern_tokens": -1},
        {"pattern_tokens": 1.5},
        {"pattern_tokens": True},
    ],
)
def test_config_refuses_bad_values(fields) -> None:
    name = next(iter(fields))
    with pytest.raises(MoefyError, match=f"ProfileConfig.{name}"):
        ProfileConfig(**fields)


def test_config_round_trip_and_older_configs() -> None:
    config = ProfileConfig(top_share=1.0, pattern_tokens=0)
    assert ProfileConfig.from_dict(config.to_dict()) == config
    old = ProfileConfig().to_dict()
    del old["top_share"], old["pattern_tokens"]
    old["version"] = 1
    assert ProfileConfig.from_dict(old).top_share == 0.1


def test_cli_options(tmp_path, capsys) -> None:
    model_dir, text = save_tiny_hf_folder(tmp_path / "tiny"), write_word_text(tmp_path / "t.jsonl")
    common = ["profile", "--model", str(model_dir), "--data", str(text), "--block-len", "16"]
    out = tmp_path / "prof"
    options = ["--tokens", "64", "--no-plots", "--top-share", "0.25", "--pattern-tokens", "8"]
    assert main([*common, *options, "--out", str(out)]) == 0
    assert "freq10 rate %" in capsys.readouterr().out
    loaded = SparsityProfile.load(out)
    assert loaded.config.top_share == 0.25 and loaded.activation_patterns(1).shape == (64, 8)
    for bad in (["--top-share", "0"], ["--top-share", "1.5"], ["--pattern-tokens", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*common, "--tokens", "64", *bad, "--out", str(tmp_path / "bad")])
        assert exit_info.value.code == 2
    assert not (tmp_path / "bad").exists()


def _two_process_worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    result = profile(tiny_model("llama"), _blocks(), DIST_CONFIG)
    save_file(
        {
            f"{name}.{i}": getattr(result, name)(i).contiguous()
            for i in range(result.num_layers)
            for name in ("activation_rate", "contribution_share", "activation_patterns")
        },
        os.path.join(out_dir, f"rank{rank}.safetensors"),
    )


@pytest.mark.slow
def test_two_processes_hold_the_single_process_result(model, tmp_path) -> None:
    spawn(_two_process_worker, str(tmp_path))
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    single = profile(model, _blocks(), DIST_CONFIG)
    for i in range(single.num_layers):
        for name in ("activation_rate", "contribution_share", "activation_patterns"):
            key = f"{name}.{i}"
            torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0)
            # only the order of the float64 sums differs; patterns are copied, not summed
            exact = name == "activation_patterns"
            torch.testing.assert_close(
                ranks[0][key], getattr(single, name)(i), rtol=0 if exact else 1e-6, atol=0
            )
