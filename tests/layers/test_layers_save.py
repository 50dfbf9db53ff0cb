"""Saving a model with dropped layers and loading it back through moefy.load_model."""

from __future__ import annotations

import json

import pytest
import torch
from layer_refs import greedy, logits

import moefy
from moefy.errors import MoefyError
from moefy.layers import drop_layers_, dropped_layers, load_dropped, restore_layers, save_dropped
from moefy.layers.saving import MARKER_FILE
from tiny_models import tiny_inputs, tiny_model, tiny_tokenizer


@pytest.mark.parametrize(
    ("name", "drop", "keep_weights"),
    [
        ("llama", dict(attention=[0], mlp=[1]), True),
        (
            "gpt2",
            dict(blocks=[1], attention=[1]),
            True,
        ),  # a dropped block holding a dropped attention
        ("opt", dict(mlp=[0], attention=[1]), False),
    ],
)
def test_save_load_gives_the_same_model(tmp_path, name, drop, keep_weights):
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    saved = drop_layers_(model, **drop, keep_weights=keep_weights)
    expected = logits(model, inputs)
    expected_tokens, _ = greedy(model, inputs["input_ids"])
    folder = save_dropped(model, tmp_path / "dropped", tokenizer=tiny_tokenizer())
    assert json.loads((folder / MARKER_FILE).read_text())["dropped"] == saved.to_dict()

    loaded, tokenizer = moefy.load_model(folder)
    assert tokenizer is not None and not loaded.training
    assert dropped_layers(loaded) == saved
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    tokens, _ = greedy(loaded, inputs["input_ids"])
    assert torch.equal(tokens, expected_tokens)
    if keep_weights:  # the kept weights came back too: restoring gives the dense model
        restore_layers(loaded)
        torch.testing.assert_close(
            logits(loaded, inputs), logits(tiny_model(name), inputs), rtol=0, atol=0
        )


def test_saving_a_model_with_nothing_dropped_is_refused(tmp_path):
    with pytest.raises(MoefyError, match="nothing is dropped"):
        save_dropped(tiny_model("llama"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_or_foreign_folders_are_clear_errors(tmp_path):
    model = tiny_model("llama")
    drop_layers_(model, attention=[1])
    folder = save_dropped(model, tmp_path / "dropped")
    (folder / MARKER_FILE).write_text("{not json")
    with pytest.raises(MoefyError, match="corrupt"):
        load_dropped(folder)
    (folder / MARKER_FILE).write_text(json.dumps({"format": "moefy-layers", "format_version": 9}))
    with pytest.raises(MoefyError, match="upgrade moefy"):
        load_dropped(folder)
    with pytest.raises(MoefyError, match="no such folder"):
        load_dropped(tmp_path / "missing")
