"""``load_model`` never unpickles and never trusts a weight file: a plain Hugging Face folder or
one of moefy's marked folders with missing, pickled, truncated, corrupt, lying or non-finite
weights, or hostile marker values, is one line that names the file; so is a model name of the
wrong type."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.layers import drop_layers_, save_dropped
from moefy.models.load import load_model
from moefy.sparsify import TopKConfig, save_sparse, sparsify_
from tiny_models import (
    grow_first_tensor,
    rewrite_safetensors_header,
    save_tiny_hf_folder,
    tiny_model,
)

WEIGHTS = "model.safetensors"


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appears if the pickle is trusted."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _load_error(path, names) -> str:
    """The one-line MoefyError ``load_model(path)`` raises; it names ``names`` (a file)."""
    with pytest.raises(MoefyError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(names) in message, message
    return message


def _edit_tensors(path, change) -> str:
    """Apply ``change(tensors)`` to a safetensors file; returns the name it changed."""
    tensors = load_file(path)
    name = change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return name


def _poison(value):
    def change(tensors):
        name = next(k for k in tensors if "down_proj" in k and k.endswith("weight"))
        tensors[name][0, 0] = value
        return name

    return change


def _drop_one(tensors):
    name = next(k for k in tensors if k.endswith("up_proj.weight"))
    del tensors[name]
    return name


def _reshape_one(tensors):
    name = next(k for k in tensors if k.endswith("up_proj.weight"))
    tensors[name] = torch.zeros(3, 3)
    return name


DAMAGED_WEIGHTS = [
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "corrupt"),
    ("empty", lambda p: p.write_bytes(b""), "corrupt"),
    ("random bytes", lambda p: p.write_bytes(bytes(range(256)) * 64), "corrupt"),
    (
        "header lies about a shape",
        lambda p: rewrite_safetensors_header(p, grow_first_tensor),
        "corrupt",
    ),
    ("nan weight", lambda p: _edit_tensors(p, _poison(float("nan"))), "non-finite"),
    ("inf weight", lambda p: _edit_tensors(p, _poison(float("inf"))), "non-finite"),
    ("a tensor missing", lambda p: _edit_tensors(p, _drop_one), "lacks"),
    ("a tensor of another shape", lambda p: _edit_tensors(p, _reshape_one), "other shapes"),
]


@pytest.fixture
def hf_folder(tmp_path):
    return save_tiny_hf_folder(tmp_path / "hf")


@pytest.mark.parametrize(
    ("damage", "pattern"), [c[1:] for c in DAMAGED_WEIGHTS], ids=[c[0] for c in DAMAGED_WEIGHTS]
)
def test_damaged_weights_of_a_plain_folder_are_one_line(hf_folder, damage, pattern):
    damage(hf_folder / WEIGHTS)
    assert pattern in _load_error(hf_folder, hf_folder / WEIGHTS)


def test_a_plain_folder_without_weights_is_one_line(hf_folder):
    (hf_folder / WEIGHTS).unlink()
    assert "no model.safetensors" in _load_error(hf_folder, hf_folder)


def test_a_pickle_weight_file_is_refused_unopened(hf_folder, tmp_path):
    pwned = tmp_path / "pwned"
    state = load_file(hf_folder / WEIGHTS)
    torch.save({**state, "payload": _CreatesFile(str(pwned))}, hf_folder / "pytorch_model.bin")
    (hf_folder / WEIGHTS).unlink()
    message = _load_error(hf_folder, hf_folder / "pytorch_model.bin")
    assert not pwned.exists()
    assert "pickle" in message and "safetensors" in message


def test_a_missing_shard_is_one_line(hf_folder):
    index = {"metadata": {}, "weight_map": {}}
    tensors = load_file(hf_folder / WEIGHTS)
    names = sorted(tensors)
    half = len(names) // 2
    for shard, part in (
        ("model-1.safetensors", names[:half]),
        ("model-2.safetensors", names[half:]),
    ):
        save_file({k: tensors[k] for k in part}, hf_folder / shard, metadata={"format": "pt"})
        index["weight_map"].update({k: shard for k in part})
    (hf_folder / WEIGHTS).unlink()
    (hf_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert load_model(hf_folder)[0] is not None  # the sharded folder itself loads
    (hf_folder / "model-2.safetensors").write_bytes(b"\0" * 16)
    assert "corrupt" in _load_error(hf_folder, hf_folder / "model-2.safetensors")


def test_an_untouched_plain_folder_still_loads(hf_folder):
    model, tokenizer = load_model(hf_folder)
    assert tokenizer is not None and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", [None, 3, "", b"folder", ["smollm2-135m"], 1.5])
def test_a_model_name_of_the_wrong_type_is_one_line(name):
    with pytest.raises(MoefyError, match="built-in name") as info:
        load_model(name)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ moefy's marked folders


def _sparse_folder(root):
    model = tiny_model("llama")
    blocks = TokenBlocks(torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(0)))
    sparsify_(model, TopKConfig(sparsity=0.5), blocks)
    return save_sparse(model, root / "sparse"), "moefy_sparsify.json"


def _dropped_folder(root):
    model = tiny_model("llama")
    drop_layers_(model, attention=[0])
    return save_dropped(model, root / "dropped"), "moefy_layers.json"


MARKED = {"sparse": _sparse_folder, "dropped": _dropped_folder}


def _edit_marker(folder, marker, change) -> None:
    path = folder / marker
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


MARKER_CASES = [
    ("dtype int8", lambda m: m.update(dtype="int8"), "dtype 'int8'"),
    ("dtype a class", lambda m: m.update(dtype="Tensor"), "dtype 'Tensor'"),
    ("dtype a number", lambda m: m.update(dtype=32), "dtype 32"),
    ("version true", lambda m: m.update(format_version=True), "format version True"),
    ("version zero", lambda m: m.update(format_version=0), "format version 0"),
    ("model class a list", lambda m: m.update(model_class=["LlamaForCausalLM"]), "class"),
]


@pytest.mark.parametrize("kind", sorted(MARKED))
@pytest.mark.parametrize(
    ("change", "pattern"), [c[1:] for c in MARKER_CASES], ids=[c[0] for c in MARKER_CASES]
)
def test_hostile_marker_values_are_one_line(tmp_path, kind, change, pattern):
    folder, marker = MARKED[kind](tmp_path)
    _edit_marker(folder, marker, change)
    assert pattern in _load_error(folder, folder / marker)


@pytest.mark.parametrize(
    ("kind", "change", "pattern"),
    [
        ("sparse", lambda m: m["sparsify_config"].update(sparsity=10**12), "sparsity"),
        ("sparse", lambda m: m.update(wrapped=5), "wrapped layers"),
        ("dropped", lambda m: m["dropped"].update(attention=[10**12]), "1000000000000"),
        ("dropped", lambda m: m["dropped"].update(attention="all"), "attention"),
    ],
)
def test_hostile_replay_values_name_the_marker(tmp_path, kind, change, pattern):
    folder, marker = MARKED[kind](tmp_path)
    _edit_marker(folder, marker, change)
    assert pattern in _load_error(folder, folder)


@pytest.mark.parametrize("kind", sorted(MARKED))
@pytest.mark.parametrize(
    ("damage", "pattern"),
    [c[1:] for c in DAMAGED_WEIGHTS[:6]],
    ids=[c[0] for c in DAMAGED_WEIGHTS[:6]],
)
def test_damaged_weights_of_a_marked_folder_are_one_line(tmp_path, kind, damage, pattern):
    folder, _ = MARKED[kind](tmp_path)
    damage(folder / WEIGHTS)
    assert pattern in _load_error(folder, folder / WEIGHTS)
