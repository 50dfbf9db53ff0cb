"""A moefied folder's metadata is checked against the safetensors header before anything is
allocated from it: hostile counts, sizes, dtypes and versions, and damaged weight files, are one
line that names the file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moefy.errors import MoefyError
from moefy.moe import MoEfyConfig, from_pretrained, moefy_, save, serialize
from tiny_models import grow_first_tensor, rewrite_safetensors_header, tiny_model

WEIGHTS = "model.safetensors"
RECORD = "moefy_config.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A moefied tiny Llama (2 layers of 4 experts) saved once; tests edit copies."""
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=4, method="params"))
    return save(model, tmp_path_factory.mktemp("saved") / "moe")


@pytest.fixture
def folder(saved, tmp_path):
    copy = tmp_path / "moe"
    copy.mkdir()
    for file in saved.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


@pytest.fixture
def real_moe_builds(monkeypatch):
    """Records the (experts, device) of every MoE layer built off the meta device."""
    built = []
    original = serialize.MoEFFN.__init__

    def recording(self, d_model, num_experts, expert_size, **kwargs):
        device = kwargs.get("device")
        if device is None or torch.device(device).type != "meta":
            built.append(num_experts)
        original(self, d_model, num_experts, expert_size, **kwargs)

    monkeypatch.setattr(serialize.MoEFFN, "__init__", recording)
    return built


def _edit(folder, change) -> None:
    path = folder / RECORD
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _set_layer(key, value, layers=(0,)):
    def change(record):
        for i in layers:
            record["layers"][i][key] = value

    return change


def _load_error(folder, file_name) -> str:
    with pytest.raises(MoefyError) as info:
        from_pretrained(folder)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(folder / file_name) in message, message
    return message


# (name, edit of the record, what the one-line message must say)
RECORD_CASES = [
    ("1000 experts", _set_layer("num_experts", 1000), "records 1000 experts x"),
    ("10**12 experts", _set_layer("num_experts", 10**12), "experts"),
    ("huge expert size", _set_layer("expert_size", 10**12), "slots"),
    ("negative experts", _set_layer("num_experts", -4), "num_experts=-4"),
    ("zero experts", _set_layer("num_experts", 0), "num_experts=0"),
    ("string experts", _set_layer("num_experts", "4"), "num_experts='4'"),
    ("float experts", _set_layer("num_experts", 4.5), "num_experts=4.5"),
    ("bool experts", _set_layer("num_experts", True), "num_experts=True"),
    ("null d_ff", _set_layer("d_ff", None), "d_ff=None"),
    ("negative index", _set_layer("index", -1), "index=-1"),
    ("index out of the model", _set_layer("index", 7), "layer index 7"),
    ("string gated", _set_layer("gated", "yes"), "gated='yes'"),
    ("fewer slots than neurons", _set_layer("expert_size", 1), "fewer than its"),
    ("bias the weights lack", _set_layer("in_bias", False), "does not give the layer"),
    ("out bias the record drops", _set_layer("out_bias", False), "does not give the layer"),
    ("layer is a string", lambda r: r["layers"].__setitem__(0, "mlp"), "not an object"),
    ("no layers", lambda r: r.update(layers=[]), "non-empty list"),
    ("layers not a list", lambda r: r.update(layers="all"), "non-empty list"),
    ("index twice", _set_layer("index", 0, layers=(1,)), "appears twice"),
    ("dtype int8", lambda r: r.update(dtype="int8"), "dtype 'int8'"),
    ("dtype a class", lambda r: r.update(dtype="Tensor"), "dtype 'Tensor'"),
    ("dtype a number", lambda r: r.update(dtype=16), "dtype 16"),
    ("version true", lambda r: r.update(version=True), "version True"),
    ("version string", lambda r: r.update(version="1"), "version '1'"),
    ("model class a number", lambda r: r.update(model_class=7), "model_class 7"),
    ("selector k too large", _set_layer("selector", {"type": "oracle", "k": 10**12}), "k="),
    ("selector not a dict", _set_layer("selector", "oracle"), "selector"),
    ("bad moefy_config", lambda r: r.update(moefy_config={"num_experts": "x"}), "moefy_config"),
]


@pytest.mark.parametrize(
    ("edit", "pattern"), [c[1:] for c in RECORD_CASES], ids=[c[0] for c in RECORD_CASES]
)
def test_hostile_records_are_one_line_before_any_allocation(folder, real_moe_builds, edit, pattern):
    _edit(folder, edit)
    message = _load_error(folder, RECORD)
    assert pattern in message
    assert real_moe_builds == []  # no MoE layer was allocated from the hostile record


def test_every_layer_wrong_is_still_one_line(folder, real_moe_builds):
    _edit(folder, _set_layer("num_experts", 1000, layers=(0, 1)))
    message = _load_error(folder, RECORD)
    assert "layer 0 records 1000 experts x 16 slots" in message
    assert "holds 4 x 16" in message and "(2 of 2 layers are wrong)" in message
    assert real_moe_builds == []


def test_every_layer_malformed_is_still_one_line(folder):
    _edit(folder, _set_layer("num_experts", -1, layers=(0, 1)))
    message = _load_error(folder, RECORD)
    assert "layer 0 has num_experts=-1" in message and "(2 of 2 layers are wrong)" in message


WEIGHT_DAMAGE = [
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    ("empty", lambda p: p.write_bytes(b"")),
    ("random bytes", lambda p: p.write_bytes(bytes(range(256)) * 64)),
    ("header lies about a shape", lambda p: rewrite_safetensors_header(p, grow_first_tensor)),
]


@pytest.fixture(params=[d[1] for d in WEIGHT_DAMAGE], ids=[d[0] for d in WEIGHT_DAMAGE])
def damage(request):
    return request.param


def test_a_damaged_weight_file_is_one_line(folder, real_moe_builds, damage):
    damage(folder / WEIGHTS)
    assert "corrupt or truncated" in _load_error(folder, WEIGHTS)
    assert real_moe_builds == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_one_line(folder, bad):
    tensors = load_file(folder / WEIGHTS)
    name = next(k for k in tensors if k.endswith("w_out"))
    tensors[name][0, 0, 0] = bad
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    message = _load_error(folder, WEIGHTS)
    assert "non-finite" in message and name in message


def test_the_weights_header_drives_the_check_not_the_record(folder):
    # the record and the weights both say 8 experts, but the weights of a 4-expert model are
    # what the file holds: the header check sees the mismatch, one line
    tensors = load_file(folder / WEIGHTS)
    name = next(k for k in tensors if k.endswith(".perm"))
    tensors[name] = torch.cat([tensors[name], tensors[name]])  # (8, S)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    message = _load_error(folder, RECORD)
    assert "records 4 experts x 16 slots" in message and "holds 8 x 16" in message


def test_a_tensor_missing_from_the_weights_is_one_line(folder, real_moe_builds):
    tensors = load_file(folder / WEIGHTS)
    name = next(k for k in tensors if k.endswith(".b_in"))
    del tensors[name]
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    message = _load_error(folder, RECORD)
    assert f"needs {name}, which {WEIGHTS} lacks" in message
    assert real_moe_builds == []


def test_a_router_of_absurd_width_is_one_line_before_any_allocation(tmp_path, real_moe_builds):
    from moefy.moe import moe_layers
    from moefy.routing.routers import MLPRouter

    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=4, method="params"))
    for moe in moe_layers(model):
        moe.selector = MLPRouter.for_layer(moe, hidden=8)
    folder = save(model, tmp_path / "routed")
    assert from_pretrained(folder) is not None  # the routed folder itself loads
    real_moe_builds.clear()
    # 10**12 x 32 float32 weights would be 128 TB if the record were trusted
    _edit(folder, lambda r: [layer["selector"].update(hidden=10**12) for layer in r["layers"]])
    message = _load_error(folder, RECORD)
    assert "selector.net.0.weight of shape (1000000000000, 32)" in message
    assert "(2 of 2 layers are wrong)" in message
    assert real_moe_builds == []


def test_an_untouched_folder_still_loads(folder):
    model = from_pretrained(folder)
    assert all(torch.isfinite(p).all() for p in model.parameters())
