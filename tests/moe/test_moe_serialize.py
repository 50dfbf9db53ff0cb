"""save / from_pretrained: identical outputs, refusals of broken folders, generate() with cache."""

from __future__ import annotations

import json

import pytest
import torch

from moefy.errors import MoefyError
from moefy.moe import (
    MoEfyConfig,
    from_pretrained,
    moe_layers,
    moefy_,
    save,
    set_selection,
    unmoefy,
)
from tiny_models import tiny_inputs, tiny_model


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "t5-gated"])
def test_save_load_gives_identical_outputs(name: str, tmp_path, run) -> None:
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    dense = run(model, inputs)
    config = MoEfyConfig(num_experts=10, method="params", seed=4)
    moefy_(model, config)
    set_selection(model, k=3)
    expected = run(model, inputs)
    save(model, tmp_path / "moe")
    loaded = from_pretrained(tmp_path / "moe")
    assert type(loaded) is type(model)
    assert torch.equal(run(loaded, inputs), expected)
    layers = moe_layers(loaded)
    assert [m.selector.num_selected() for m in layers] == [3] * len(layers)
    assert layers[0].moefy_config == config
    unmoefy(loaded)  # the loaded model can be made dense again
    torch.testing.assert_close(run(loaded, inputs), dense, atol=0, rtol=0)


def test_saved_folder_contents(tmp_path) -> None:
    model = tiny_model("gpt2")
    moefy_(model, MoEfyConfig(num_experts=4))
    save(model, tmp_path / "moe")
    names = {p.name for p in (tmp_path / "moe").iterdir()}
    assert {"config.json", "model.safetensors", "moefy_config.json"} <= names
    record = json.loads((tmp_path / "moe" / "moefy_config.json").read_text())
    assert record["version"] == 1 and record["model_class"] == "GPT2LMHeadModel"
    assert [layer["num_experts"] for layer in record["layers"]] == [4, 4]
    assert record["layers"][0]["selector"] == {"type": "oracle", "k": None, "fraction": None}
    assert not list(tmp_path.glob(".moe.*"))  # no temporary left behind


def _saved(tmp_path):
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=4))
    return save(model, tmp_path / "moe")


def _edit_record(folder, edit) -> None:
    path = folder / "moefy_config.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    "breakage",
    [
        lambda f: (f / "model.safetensors").unlink(),
        lambda f: (f / "moefy_config.json").unlink(),
        lambda f: (f / "moefy_config.json").write_text("{oops"),
        lambda f: _edit_record(f, lambda r: r.update(version=7)),
        lambda f: _edit_record(f, lambda r: r.update(format="other")),
        lambda f: _edit_record(f, lambda r: r["layers"][0].update(num_experts=8, expert_size=8)),
        lambda f: _edit_record(f, lambda r: r["layers"][1].update(index=9)),
        lambda f: _edit_record(f, lambda r: r["layers"][0].update(selector={"type": "nope"})),
        lambda f: _edit_record(f, lambda r: r["layers"].pop()),
        lambda f: (f / "model.safetensors").write_bytes(b"\0" * 64),
    ],
)
def test_broken_folders_raise(tmp_path, breakage) -> None:
    folder = _saved(tmp_path)
    breakage(folder)
    with pytest.raises(MoefyError):
        from_pretrained(folder)


def test_missing_folder_raises(tmp_path) -> None:
    with pytest.raises(MoefyError, match="no such folder"):
        from_pretrained(tmp_path / "nothing")


def test_dense_model_cannot_be_saved_as_moe(tmp_path) -> None:
    with pytest.raises(MoefyError, match="no MoE"):
        save(tiny_model("llama"), tmp_path / "dense")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_with_cache_matches_dense(name: str, tmp_path) -> None:
    model = tiny_model(name)
    prompt = tiny_inputs(name, batch=1, seq=6)["input_ids"]
    settings = {"max_new_tokens": 8, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    dense = model.generate(prompt, **settings)
    moefy_(model, MoEfyConfig(num_experts=8, method="params"))
    assert torch.equal(model.generate(prompt, **settings), dense)
    save(model, tmp_path / "moe")
    loaded = from_pretrained(tmp_path / "moe")
    assert torch.equal(loaded.generate(prompt, **settings), dense)
    set_selection(loaded, k=4)
    sparse = loaded.generate(prompt, **settings)
    assert sparse.shape == dense.shape


def test_hand_built_moe_without_place_cannot_be_saved(tmp_path) -> None:
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=4))
    moe_layers(model)[0].site_name = ""
    with pytest.raises(MoefyError, match="place"):
        save(model, tmp_path / "moe")
