"""Inputs the export refuses: one-line MoefyError, nothing written."""

from __future__ import annotations

import pytest
import torch
from export_support import blocks, carved, tiny_llama

import moefy
from moefy.errors import MoefyError
from moefy.finetune import relufy_
from moefy.layers import drop_layers_
from moefy.moe import moe_layers
from moefy.routing import set_routing
from tiny_models import tiny_model


def _not_moefied():
    return tiny_llama()


def _gpt2():
    return tiny_model("gpt2")


def _dropped():
    model = carved()
    drop_layers_(model, attention=[1])
    return model


def _per_layer_k():
    model = carved()
    set_routing(model, "topk", k=[4, 6])
    return model


def _dynamic():
    model = carved()
    set_routing(model, "dynamic", tau=0.9)
    return model


def _fatrelu():
    model = tiny_llama()
    relufy_(model, threshold=0.1)
    return carved(model)


def _ffn_bias():
    model = carved(tiny_llama(mlp_bias=True))
    with torch.no_grad():
        moe_layers(model)[0].b_out.fill_(0.5)
    return model


def _routed_without_data():
    model = carved()
    set_routing(model, "topk", keep=0.5)
    return model


# (case, model factory, export options, words the message must hold)
CASES = [
    ("not moefied", _not_moefied, {}, "not moefied"),
    ("no counterpart", _gpt2, {}, "no standard MoE counterpart"),
    ("dropped layers", _dropped, {}, "dropped layers"),
    ("per-layer k", _per_layer_k, {}, "num_experts_per_tok"),
    ("dynamic rule", _dynamic, {}, "dynamic"),
    ("FATReLU threshold", _fatrelu, {}, "FATReLU"),
    ("FFN bias", _ffn_bias, {}, "biases"),
    ("routing without data", _routed_without_data, {}, "calibration text"),
    ("unknown format", carved, {"format": "onnx"}, "unknown export format"),
    ("dtype of another format", carved, {"dtype": "q8_0"}, "q8_0"),
    ("unknown target", _routed_without_data, {"data": blocks(), "target": "x"}, "target"),
]


@pytest.mark.parametrize(("case", "make", "options", "words"), CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path, case, make, options, words) -> None:
    model = make()
    with pytest.raises(MoefyError, match=words) as info:
        moefy.export(model, tmp_path / "out", **options)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused(tmp_path) -> None:
    model = carved()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(MoefyError):
        moefy.export(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    moefy.export(model, tmp_path / "hf")
    with pytest.raises(MoefyError, match="overwrite"):
        moefy.export(model, tmp_path / "hf")
    moefy.export(model, tmp_path / "hf", overwrite=True)  # moefy wrote it: replaced on request
