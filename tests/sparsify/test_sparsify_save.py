"""Save then load keeps thresholds and outputs; corrupt or mismatched folders are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from moefy.errors import MoefyError
from moefy.sparsify import (
    CHESSConfig,
    TEALConfig,
    TopKConfig,
    WINAConfig,
    load_sparse,
    save_sparse,
    sparsify_,
    sparsify_config_of,
)
from moefy.sparsify.wrappers import sparse_modules
from tiny_models import tiny_inputs, tiny_model

EXACT = {"rtol": 0.0, "atol": 0.0}
FAST = {"min_calibration_tokens": 1, "calibration_passes": 1}


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("llama", TEALConfig(sparsity=0.5, greedy_tokens=32, **FAST)),
        ("phi3", CHESSConfig(sparsity=0.5, **FAST)),
        ("gpt2", WINAConfig(sparsity=0.4, attention=True, greedy=False, **FAST)),
        ("t5", TopKConfig(sparsity=0.5)),
    ],
    ids=["llama-teal", "phi3-chess", "gpt2-wina", "t5-topk"],
)
def test_save_then_load_keeps_thresholds_and_outputs(name, config, small_blocks, tmp_path):
    model = tiny_model(name)
    sparsify_(model, config, small_blocks)
    inputs = tiny_inputs(name)
    with torch.no_grad():
        expected = model(**inputs)[0]
    folder = save_sparse(model, tmp_path / "sparse")
    # generation_config.json comes with generative models' weights, as transformers saves them
    assert {p.name for p in folder.iterdir()} - {"generation_config.json"} == {
        "config.json",
        "model.safetensors",
        "moefy_output.json",
        "moefy_sparsify.json",
    }
    marker = json.loads((folder / "moefy_sparsify.json").read_text())
    assert marker["format_version"] == 1 and marker["sparsify_config"] == config.to_dict()
    loaded = load_sparse(folder)
    assert sparsify_config_of(loaded) == config
    saved = dict(sparse_modules(model))
    loaded_wrappers = dict(sparse_modules(loaded))
    assert list(loaded_wrappers) == list(saved)
    for path, wrapper in saved.items():
        if hasattr(wrapper, "threshold"):
            assert torch.count_nonzero(wrapper.threshold) > 0
            torch.testing.assert_close(loaded_wrappers[path].threshold, wrapper.threshold, **EXACT)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[0], expected, **EXACT)


def _saved(tmp_path, small_blocks):
    model = tiny_model("llama")
    sparsify_(model, TEALConfig(sparsity=0.5, greedy=False, **FAST), small_blocks)
    return save_sparse(model, tmp_path / "sparse")


def test_dense_model_cannot_be_saved(tmp_path):
    with pytest.raises(MoefyError, match="not sparsified"):
        save_sparse(tiny_model("llama"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_missing_or_corrupt_marker(tmp_path, small_blocks):
    with pytest.raises(MoefyError, match="no such folder"):
        load_sparse(tmp_path / "nowhere")
    folder = _saved(tmp_path, small_blocks)
    marker = folder / "moefy_sparsify.json"
    text = marker.read_text()
    marker.write_text(text[: len(text) // 2])
    with pytest.raises(MoefyError, match="corrupt"):
        load_sparse(folder)
    data = json.loads(text)
    marker.write_text(json.dumps(data | {"format_version": 99}))
    with pytest.raises(MoefyError, match="upgrade moefy"):
        load_sparse(folder)
    marker.write_text(json.dumps(data | {"sparsify_config": {"method": "cats", "sparsity": 0.5}}))
    with pytest.raises(MoefyError, match="do not match"):
        load_sparse(folder)
    marker.unlink()
    with pytest.raises(MoefyError, match="not a moefy sparse model folder"):
        load_sparse(folder)


def test_corrupt_or_mismatched_weights(tmp_path, small_blocks):
    folder = _saved(tmp_path, small_blocks)
    weights = folder / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(MoefyError, match="model.safetensors"):
        load_sparse(folder)
    # weights of another sparsifier (per-channel WINA thresholds) under a TEAL marker
    other = tiny_model("llama")
    sparsify_(other, WINAConfig(sparsity=0.5, greedy=False, **FAST), small_blocks)
    save_sparse(other, tmp_path / "wina")
    weights.write_bytes((tmp_path / "wina" / "model.safetensors").read_bytes())
    with pytest.raises(MoefyError, match="does not match the model"):
        load_sparse(folder)
    weights.unlink()
    with pytest.raises(MoefyError, match="missing"):
        load_sparse(folder)


def test_save_replaces_a_folder_atomically(tmp_path, small_blocks):
    folder = _saved(tmp_path, small_blocks)
    model = tiny_model("llama")
    sparsify_(model, TopKConfig(sparsity=0.25))
    with pytest.raises(MoefyError, match="pass --overwrite"):
        save_sparse(model, folder)
    save_sparse(model, folder, overwrite=True)
    assert sparsify_config_of(load_sparse(folder)) == TopKConfig(sparsity=0.25)
    assert [p.name for p in tmp_path.iterdir()] == ["sparse"]  # no temporary leftovers
