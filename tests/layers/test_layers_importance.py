"""Layer importance: similarities against a brute-force computation, perplexities, JSON, plots."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from layer_refs import zeroed
from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.eval.perplexity import perplexity
from moefy.layers import (
    LayerImportance,
    LayerImportanceConfig,
    LayerScores,
    drop_layers_,
    layer_importance,
)
from moefy.layers.plots import PERPLEXITY_PLOT, SIMILARITY_PLOT
from tiny_models import CAUSAL_ARCH_NAMES, tiny_model

# where each architecture keeps its final norm (replaced by Identity in the brute force, so the
# last hidden state is the raw residual stream)
FINAL_NORM = {
    "gpt2": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
    "opt": "model.decoder.final_layer_norm",
}
DEFAULT_FINAL_NORM = "model.norm"
SIMILARITY_TOL = {"atol": 1e-5, "rtol": 1e-5}


def _blocks(num_blocks: int = 3, block_len: int = 10, seed: int = 0) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    return TokenBlocks(torch.randint(3, 128, (num_blocks, block_len), generator=gen))


def _residual_streams(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Block inputs and the last block's output: (L + 1) tensors of (B, T, D)."""
    with torch.no_grad():
        return list(model(input_ids=input_ids, output_hidden_states=True).hidden_states)


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def _brute_force(model: nn.Module, name: str, data: TokenBlocks) -> torch.Tensor:
    """(L, 3) attention, MLP and block similarities from whole-model runs, no hooks of ours."""
    raw = copy.deepcopy(model)
    norm_path = FINAL_NORM.get(name, DEFAULT_FINAL_NORM)
    parent, _, attr = norm_path.rpartition(".")
    setattr(raw.get_submodule(parent), attr, nn.Identity())
    ids = data.input_ids
    streams = _residual_streams(raw, ids)
    num_blocks = len(streams) - 1
    scores = torch.zeros(num_blocks, 3, dtype=torch.float64)
    for i in range(num_blocks):
        # with block i's MLP zeroed, block i outputs the stream after its attention: x + a
        with zeroed(raw, mlp=(i,)):
            mid = _residual_streams(raw, ids)[i + 1]
        x, y = streams[i], streams[i + 1]
        scores[i] = torch.tensor([_mean_cos(x, mid), _mean_cos(mid, y), _mean_cos(x, y)])
    return scores


@pytest.mark.parametrize("name", CAUSAL_ARCH_NAMES)
def test_similarities_match_brute_force(name):
    model = tiny_model(name)
    data = _blocks()
    importance = layer_importance(model, data, LayerImportanceConfig(batch_size=2))
    expected = _brute_force(model, name, data)
    got = torch.tensor(
        [
            [row.attention_similarity, row.mlp_similarity, row.block_similarity]
            for row in importance.layers
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, expected, **SIMILARITY_TOL)
    assert importance.n_tokens == data.n_tokens
    # random tiny models: the parts do change the stream, so this is not trivially 1
    assert (got < 1 - 1e-3).any()


def test_hooks_are_removed_even_on_error():
    model = tiny_model("llama")
    bad = TokenBlocks(torch.full((1, 4), 10_000))  # token ids beyond the vocabulary
    with pytest.raises(IndexError):
        layer_importance(model, bad)
    assert all(
        not module._forward_hooks and not module._forward_pre_hooks for module in model.modules()
    )


def test_dropped_parts_score_one():
    model = tiny_model("llama")
    drop_layers_(model, mlp=[1], blocks=[0])
    importance = layer_importance(model, _blocks())
    assert importance.layers[0].block_similarity == pytest.approx(1.0)
    assert importance.layers[1].mlp_similarity == pytest.approx(1.0)
    assert importance.layers[1].attention_similarity < 1.0


def test_perplexity_without_each_part():
    model = tiny_model("llama")
    data = _blocks()
    importance = layer_importance(model, data, LayerImportanceConfig(perplexity=True))
    assert importance.dense_perplexity == pytest.approx(perplexity(model, data).perplexity)
    with zeroed(model, attention=(1,)):
        without_attention_1 = perplexity(model, data).perplexity
    with zeroed(model, mlp=(0,)):
        without_mlp_0 = perplexity(model, data).perplexity
    assert importance.layers[1].attention_perplexity == pytest.approx(without_attention_1)
    assert importance.layers[0].mlp_perplexity == pytest.approx(without_mlp_0)
    assert importance.layers[0].mlp_perplexity != pytest.approx(importance.dense_perplexity)
    assert all(row.block_perplexity is not None for row in importance.layers)
    # the model is left as it was
    assert perplexity(model, data).perplexity == pytest.approx(importance.dense_perplexity)


def _fake_importance(similarities, perplexities=None) -> LayerImportance:
    rows = []
    for i, (attn, mlp, block) in enumerate(similarities):
        ppl = perplexities[i] if perplexities else (None, None, None)
        rows.append(LayerScores(i, f"model.layers.{i}", attn, mlp, block, *ppl))
    return LayerImportance(
        layers=tuple(rows),
        n_tokens=100,
        dense_perplexity=10.0 if perplexities else None,
        model_type="llama",
        config=LayerImportanceConfig(perplexity=bool(perplexities)),
    )


def test_most_redundant_ranks_by_similarity():
    importance = _fake_importance([(0.5, 0.9, 0.4), (0.99, 0.8, 0.7), (0.7, 0.95, 0.7)])
    assert importance.most_redundant("attention", 2) == [1, 2]
    assert importance.most_redundant("mlp", 1) == [2]
    assert importance.most_redundant("block", 2) == [1, 2]  # tie: the earlier block first
    assert importance.most_redundant("block", 0) == []
    with pytest.raises(MoefyError, match="0..3"):
        importance.most_redundant("attention", 4)
    with pytest.raises(MoefyError, match="unknown part"):
        importance.most_redundant("ffn", 1)


def test_json_round_trip_rows_and_plots(tmp_path):
    importance = _fake_importance(
        [(0.5, 0.9, 0.4), (0.99, 0.8, 0.7)], [(11.0, 12.0, 30.0), (10.5, None, 13.0)]
    )
    path = importance.save(tmp_path / "importance.json")
    assert LayerImportance.load(path) == importance
    rows = importance.rows()
    assert rows[0]["attn dppl"] == pytest.approx(1.0) and rows[1]["block dppl"] == 3.0
    paths = importance.plot(tmp_path / "plots")
    assert [p.name for p in paths] == [SIMILARITY_PLOT, PERPLEXITY_PLOT]
    for p in paths:
        assert p.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(MoefyError, match="not a moefy layer-importance"):
        LayerImportance.load(tmp_path / "bad.json")


def test_config_validation_and_round_trip():
    config = LayerImportanceConfig(batch_size=4, perplexity=True)
    assert LayerImportanceConfig.from_dict(config.to_dict()) == config
    with pytest.raises(MoefyError, match="batch_size"):
        LayerImportanceConfig(batch_size=0)
    with pytest.raises(MoefyError, match="unknown fields"):
        LayerImportanceConfig.from_dict({"batch": 3})
    with pytest.raises(MoefyError, match="version"):
        LayerImportanceConfig(version=99)


def test_encoder_models_are_refused():
    with pytest.raises(MoefyError, match="decoder-only"):
        layer_importance(tiny_model("bert"), _blocks())
