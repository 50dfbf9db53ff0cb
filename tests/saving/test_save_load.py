"""One saved format: ``moefy.save`` then ``moefy.load`` gives the same outputs for every change
moefy makes, alone or combined; folders of the previous release still load; a toy change
registered from this file alone is saved and replayed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import moefy
from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.finetune import FATReLU, relufy_
from moefy.io import OUTPUT_MARKER
from moefy.layers import drop_layers_, dropped_layers
from moefy.moe import MoEfyConfig, moe_layers, moefy_, set_selection
from moefy.routing.routers import MLPRouter
from moefy.saving import (
    FORMAT_NAME,
    SAVED_FORMATS,
    ChangeFormat,
    load_folder,
    register_format,
    saved_changes,
)
from moefy.sparsify import TopKConfig, sparsify_, sparsify_config_of
from tiny_models import tiny_inputs, tiny_model

NAME = "llama"


def _blocks() -> TokenBlocks:
    generator = torch.Generator().manual_seed(0)
    return TokenBlocks(torch.randint(3, 120, (4, 16), generator=generator))


def _relufy(model: nn.Module) -> None:
    relufy_(model, threshold=0.05)


def _moefy(model: nn.Module) -> None:
    moefy_(model, MoEfyConfig(num_experts=8, method="params", seed=1))
    set_selection(model, k=3)


def _route(model: nn.Module) -> None:
    torch.manual_seed(0)
    for moe in moe_layers(model):
        moe.selector = MLPRouter.for_layer(moe, hidden=8)
    set_selection(model, k=3)


def _sparsify(model: nn.Module) -> None:
    sparsify_(model, TopKConfig(sparsity=0.5), _blocks())


def _drop_attention(model: nn.Module) -> None:
    drop_layers_(model, attention=[1])


def _drop_mlp(model: nn.Module) -> None:
    drop_layers_(model, mlp=[0])


# (id, changes applied in this order, the formats the folder records)
CASES = [
    ("relufied", (_relufy,), ["moefy-relu"]),
    ("moefied", (_moefy,), ["moefy-moe"]),
    ("routed", (_moefy, _route), ["moefy-moe"]),
    ("sparsified", (_sparsify,), ["moefy-sparsify"]),
    ("dropped", (_drop_attention,), ["moefy-layers"]),
    ("relufied+moefied", (_relufy, _moefy), ["moefy-relu", "moefy-moe"]),
    ("dropped+sparsified", (_drop_attention, _sparsify), ["moefy-sparsify", "moefy-layers"]),
    ("sparsified+dropped", (_sparsify, _drop_mlp), ["moefy-sparsify", "moefy-layers"]),
    ("moefied+routed+dropped", (_moefy, _route, _drop_mlp), ["moefy-moe", "moefy-layers"]),
    (
        "relufied+sparsified+dropped",
        (_relufy, _sparsify, _drop_attention),
        ["moefy-relu", "moefy-sparsify", "moefy-layers"],
    ),
]


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(NAME)).logits


def _changed(changes: tuple[Callable[[nn.Module], None], ...]) -> nn.Module:
    model = tiny_model(NAME)
    for change in changes:
        change(model)
    return model.eval()


@pytest.mark.parametrize(("changes", "formats"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_save_then_load_gives_identical_outputs(tmp_path, changes, formats):
    model = _changed(changes)
    expected = _logits(model)
    folder = moefy.save(model, tmp_path / "changed")
    manifest = json.loads((folder / OUTPUT_MARKER).read_text())
    assert manifest["format"] == FORMAT_NAME and manifest["version"] == 1
    assert manifest["changes"] == formats
    assert [change.name for change in saved_changes(folder)] == formats

    loaded, tokenizer = moefy.load(folder)
    assert tokenizer is None and not loaded.training
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert len(moe_layers(loaded)) == len(moe_layers(model))
    assert sparsify_config_of(loaded) == sparsify_config_of(model)
    if "moefy-layers" in formats:
        assert dropped_layers(loaded) == dropped_layers(model)
    thresholds = {m.threshold for m in loaded.modules() if isinstance(m, FATReLU)}
    assert thresholds == ({0.05} if "moefy-relu" in formats else set())


def test_a_routed_model_keeps_its_routers(tmp_path):
    model = _changed((_moefy, _route))
    loaded = load_folder(moefy.save(model, tmp_path / "routed"))
    for saved, back in zip(moe_layers(model), moe_layers(loaded), strict=True):
        assert type(back.selector) is MLPRouter
        for (name, a), (_, b) in zip(
            saved.selector.state_dict().items(), back.selector.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name


def test_a_tied_embedding_stays_tied(tmp_path):
    model = tiny_model("gpt2")
    _moefy(model)
    loaded = load_folder(moefy.save(model, tmp_path / "tied"))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_a_dense_model_is_refused(tmp_path):
    with pytest.raises(MoefyError, match="carries no change moefy made"):
        moefy.save(tiny_model(NAME), tmp_path / "dense")
    assert not (tmp_path / "dense").exists()


@pytest.fixture
def relu_moe_folder(tmp_path) -> Path:
    model = _changed((_relufy, _moefy))
    return moefy.save(model, tmp_path / "relu-moe")


def _edit_manifest(folder: Path, **fields) -> None:
    manifest = json.loads((folder / OUTPUT_MARKER).read_text())
    manifest.update(fields)
    (folder / OUTPUT_MARKER).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"version": 2}, "reads up to 1: upgrade moefy"),
        ({"version": "1"}, "version '1'"),
        ({"format": "other"}, "not a moefy-model manifest"),
        ({"changes": []}, "lists no changes"),
        ({"changes": ["moefy-moe", "moefy-moe"]}, "a change twice"),
        ({"changes": ["moefy-psychic"]}, "unknown saved format 'moefy-psychic'"),
    ],
)
def test_a_bad_manifest_is_one_line(relu_moe_folder, fields, pattern):
    _edit_manifest(relu_moe_folder, **fields)
    with pytest.raises(MoefyError, match=pattern) as info:
        moefy.load(relu_moe_folder)
    assert "\n" not in str(info.value)


def test_records_that_disagree_are_refused(relu_moe_folder):
    path = relu_moe_folder / "moefy_relu.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"model_class": "GPT2LMHeadModel"}))
    with pytest.raises(MoefyError, match="do not belong together"):
        moefy.load(relu_moe_folder)


def test_several_records_without_a_manifest_are_refused(relu_moe_folder):
    (relu_moe_folder / OUTPUT_MARKER).unlink()
    with pytest.raises(MoefyError, match="2 change records"):
        moefy.load(relu_moe_folder)


@pytest.mark.parametrize("marker", ["none", "previous release"])
def test_a_folder_of_the_previous_release_still_loads(tmp_path, marker):
    model = _changed((_moefy,))
    expected = _logits(model)
    folder = moefy.save(model, tmp_path / "old")
    if marker == "none":  # the release before the output marker
        (folder / OUTPUT_MARKER).unlink()
    else:  # the output marker without a manifest
        (folder / OUTPUT_MARKER).write_text(json.dumps({"writer": "moefy", "moefy_version": "0"}))
    loaded, _ = moefy.load_model(folder)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)


def test_one_change_loaders_require_their_change(relu_moe_folder):
    from moefy.layers import load_dropped
    from moefy.moe import from_pretrained
    from moefy.sparsify import load_sparse

    assert moe_layers(from_pretrained(relu_moe_folder))
    with pytest.raises(MoefyError, match="has no moefy_sparsify.json"):
        load_sparse(relu_moe_folder)
    with pytest.raises(MoefyError, match="has no moefy_layers.json"):
        load_dropped(relu_moe_folder)


# ------------------------------------------------------------------ a toy change, from here alone

TOY_ATTR = "toy_note"
TOY_FILE = "moefy_toy.json"


class _Note(nn.Module):
    """Scales the final norm's output: a structure change with a saved parameter."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.scale


def _toy_capture(model: nn.Module) -> dict | None:
    if not isinstance(model.model.norm, _Note):
        return None
    return {"format": "moefy-toy", "model_class": type(model).__name__, "dtype": "float32"}


def _toy_read(folder: Path) -> dict:
    return json.loads((folder / TOY_FILE).read_text())


def _toy_replay(model, record, header, folder) -> None:
    assert model.model.norm.weight.is_meta  # replayed before the weights, on the meta device
    assert header["model.norm.scale"] == ((), "F32")
    model.model.norm = _Note(model.model.norm)


@pytest.fixture
def toy_format():
    change = ChangeFormat(
        name="moefy-toy",
        file=TOY_FILE,
        rank=35,
        capture=_toy_capture,
        read=_toy_read,
        replay=_toy_replay,
    )
    register_format(change)
    yield change
    SAVED_FORMATS.unregister(change.name)


def test_a_change_registered_alone_is_saved_and_replayed(tmp_path, toy_format):
    model = _changed((_sparsify,))
    model.model.norm = _Note(model.model.norm)
    with torch.no_grad():
        model.model.norm.scale.fill_(1.5)
    expected = _logits(model)
    folder = moefy.save(model, tmp_path / "toy")
    assert json.loads((folder / OUTPUT_MARKER).read_text())["changes"] == [
        "moefy-sparsify",
        "moefy-toy",
    ]
    loaded, _ = moefy.load(folder)
    assert isinstance(loaded.model.norm, _Note)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)


def test_save_and_load_are_the_package_verbs():
    from moefy.models.load import load
    from moefy.saving import save

    assert moefy.save is save and moefy.load is load
