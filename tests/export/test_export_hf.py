"""moefy.export to a transformers Qwen2-MoE folder: exact with every expert, close when routed,
loaded by plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from export_support import blocks, carved, tiny_llama, token_ids

import moefy
from moefy.export import compare_export
from moefy.finetune import relufy_
from moefy.moe import moe_layers
from moefy.routing import set_routing
from tiny_models import tiny_tokenizer

FP32 = {"atol": 1e-5, "rtol": 1e-5}


def _load(path) -> torch.nn.Module:
    return T.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


@torch.no_grad()
def test_every_expert_equals_the_dense_model(tmp_path) -> None:
    model = tiny_llama()
    ids = token_ids()
    dense = model(input_ids=ids).logits
    carved(model)
    report = moefy.export(model, tmp_path / "hf", tokenizer=tiny_tokenizer())
    loaded = _load(tmp_path / "hf")
    assert type(loaded).__name__ == "Qwen2MoeForCausalLM"
    torch.testing.assert_close(loaded(input_ids=ids).logits, dense, **FP32)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["tie_word_embeddings"] is True
    assert (config["num_experts"], config["num_experts_per_tok"]) == (6, 6)
    assert config["shared_expert_intermediate_size"] == 16 and config["norm_topk_prob"] is False
    assert report.router.n_tokens == 0  # nothing to fit: every expert runs
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    block = loaded.model.layers[0]
    assert not block.self_attn.q_proj.bias.any()
    assert not block.mlp.shared_expert_gate.weight.any()  # sigmoid(0) = 0.5, 2 folded in


@torch.no_grad()
def test_routed_export_is_close_to_moefy_and_reports_its_fit(tmp_path) -> None:
    model = carved()
    set_routing(model, "topk", keep=0.5)  # 4 of 8: the 2 shared + 2 of 6 routed
    calibration, evaluation = blocks(seed=4), blocks(n=4, seed=5)
    report = moefy.export(model, tmp_path / "hf", data=calibration)
    assert report.experts_per_token == 2 and report.num_experts == 6
    fit = report.router
    assert fit.mean_recall > 0.8
    assert fit.mean_weight_error < 5e-3  # softmax weights within 0.5 % of 1/E_r
    check = compare_export(model, report, evaluation)
    assert abs(check.ratio - 1) < 0.03
    record = json.loads((tmp_path / "hf" / "moefy_export.json").read_text())
    assert record["router_recall"] == [f.recall for f in fit.layers]


def test_logit_spread_scales_the_router_and_keeps_its_choices(tmp_path) -> None:
    model = carved()
    set_routing(model, "topk", keep=0.5)
    calibration = blocks(seed=4)
    narrow = moefy.export(model, tmp_path / "narrow", data=calibration)
    wide = moefy.export(model, tmp_path / "wide", data=calibration, logit_spread=0.1)
    for a, b in zip(narrow.router.layers, wide.router.layers, strict=True):
        assert b.scale == pytest.approx(100 * a.scale)  # the default spread is 1e-3
        torch.testing.assert_close(b.weight, 100 * a.weight)
        assert b.recall == a.recall  # scaling keeps the ranking, so the top-k
    # the weights' spread grows with the logits' (near 1/E_r at 1e-3, not at 0.1)
    assert wide.router.mean_weight_error > 10 * narrow.router.mean_weight_error


@torch.no_grad()
def test_oracle_target_and_relu_models_export(tmp_path) -> None:
    model = tiny_llama()
    relufy_(model)
    ids = token_ids()
    dense = model(input_ids=ids).logits
    carved(model, router="oracle")
    moefy.export(model, tmp_path / "all")
    assert json.loads((tmp_path / "all" / "config.json").read_text())["hidden_act"] == "relu"
    torch.testing.assert_close(_load(tmp_path / "all")(input_ids=ids).logits, dense, **FP32)
    set_routing(model, "topk", keep=0.5)
    report = moefy.export(model, tmp_path / "routed", data=blocks(seed=4), target="oracle")
    assert report.router.target == "oracle" and report.router.mean_recall > 0.6


@torch.no_grad()
def test_dense_layers_become_mlp_only_layers(tmp_path) -> None:
    model = tiny_llama()
    ids = token_ids()
    dense = model(input_ids=ids).logits
    dense_mlp = model.model.layers[1].mlp
    carved(model)
    model.model.layers[1].mlp = dense_mlp  # layer 1 stays dense
    assert [m.layer_index for m in moe_layers(model)] == [0]
    report = moefy.export(model, tmp_path / "hf", dtype="fp32")
    assert report.dense_layers == [1]
    loaded = _load(tmp_path / "hf")
    assert loaded.config.mlp_only_layers == [1]
    torch.testing.assert_close(loaded(input_ids=ids).logits, dense, **FP32)


def test_the_verb_stays_callable_after_its_package_is_imported(tmp_path) -> None:
    import moefy.export as package

    assert callable(moefy.export) and callable(package)
    report = package(carved(), tmp_path / "hf")
    assert report.format == "hf" and (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bf16", torch.bfloat16)])
def test_stored_dtype(tmp_path, dtype, torch_dtype) -> None:
    moefy.export(carved(), tmp_path / "hf", dtype=dtype)
    assert _load(tmp_path / "hf").model.layers[0].mlp.experts.gate_up_proj.dtype == torch_dtype
