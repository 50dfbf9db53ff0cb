"""rotate (LaRoSa): PCA rotations folded into the weights, exact when dense, the kernel path, save
and load, unsparsify, calibration reuse, the rotation's cost in the FLOPs and hostile inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moefy.errors import MoefyError
from moefy.kernels import use_backend
from moefy.sparsify import load_sparse, save_sparse, sparsify_, unsparsify
from moefy.sparsify.methods import RotateConfig
from moefy.sparsify.rotation import RotatedLinear, SharedRotation, principal_rotation
from moefy.sparsify.wrappers import ThresholdLinear, sparse_modules
from tiny_models import D, tiny_inputs, tiny_model
from tiny_models import F as FFN_WIDTH

EXACT = {"rtol": 0.0, "atol": 0.0}
FAST = {"min_calibration_tokens": 1, "calibration_passes": 1, "greedy_tokens": 64}


def _rotated(model) -> dict[str, RotatedLinear]:
    return {p: w for p, w in sparse_modules(model) if isinstance(w, RotatedLinear)}


def _outputs(model, name="llama"):
    with torch.no_grad():
        return model(**tiny_inputs(name))[0]


@pytest.mark.parametrize(
    ("name", "attention", "rotated"),
    [("llama", False, 2), ("llama", True, 5), ("phi3", True, 2), ("gpt2", True, 2)],
)
def test_zero_sparsity_is_exact_and_rotations_are_orthogonal(
    name, attention, rotated, calibration_blocks
):
    model = tiny_model(name)
    expected = _outputs(model, name)
    sparsify_(model, RotateConfig(sparsity=0.0, attention=attention, **FAST), calibration_blocks)
    torch.testing.assert_close(_outputs(model, name), expected, **EXACT)
    wrappers = _rotated(model)
    assert len(wrappers) == rotated * 2  # per block: gate+up (or fused), and q/k/v (or qkv)
    for wrapper in wrappers.values():
        q = wrapper.rotation.double()
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=torch.float64))
        assert not torch.allclose(q, torch.eye(q.shape[0], dtype=torch.float64))


def test_principal_rotation_orders_components_by_energy():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen, dtype=torch.float64) * torch.tensor([1, 5, 2, 9, 3, 4])
    q = principal_rotation(x.T @ x)
    energy = ((x @ q) ** 2).sum(0)  # (C,)
    assert torch.all(energy[:-1] >= energy[1:])
    torch.testing.assert_close(q.T @ q, torch.eye(6, dtype=torch.float64))
    assert torch.all(q[q.abs().argmax(0), torch.arange(6)] > 0)  # one sign on every run


def test_gate_and_up_share_one_rotation_computed_once(calibration_blocks):
    model = tiny_model("llama")
    sparsify_(model, RotateConfig(sparsity=0.5, greedy=False, **FAST), calibration_blocks)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.shared is mlp.up_proj.shared
    torch.testing.assert_close(mlp.gate_proj.rotation, mlp.up_proj.rotation, **EXACT)
    shared, rotation = SharedRotation(members=2), mlp.gate_proj.rotation
    x = torch.randn(3, D)
    first = shared.rotate(x, rotation)
    assert shared.rotate(x, rotation) is first  # the second member reuses the first's product
    assert shared._rotated is None  # released once every member read it
    assert shared.rotate(x.clone(), rotation) is not first


def test_forward_thresholds_the_rotated_input_and_reads_the_rotated_weight(calibration_blocks):
    model = tiny_model("llama")
    sparsify_(model, RotateConfig(sparsity=0.5, greedy=False, **FAST), calibration_blocks)
    up = model.model.layers[1].mlp.up_proj
    x = torch.randn(2, 7, D)
    z = x @ up.rotation  # (2, 7, C)
    kept = z.masked_fill(z.abs() <= up.threshold, 0.0)
    expected = F.linear(kept, up.base_layer.weight @ up.rotation, up.base_layer.bias)
    with torch.no_grad(), use_backend("reference"):
        got = up(x)
    torch.testing.assert_close(got, expected)
    assert 0.0 < float((kept == 0).float().mean()) < 1.0  # some entries dropped, not all


def test_kernel_path_equals_masked_path(calibration_blocks):
    model = tiny_model("llama")
    sparsify_(model, RotateConfig(sparsity=0.5, **FAST), calibration_blocks)
    up = model.model.layers[0].mlp.up_proj
    tokens = torch.randn(4, D)  # decode-sized: the kernel's batch
    with torch.no_grad():
        with use_backend("reference"):
            up.reset_counters()
            expected, zeros = up(tokens), int(up.zeros_seen)
        with use_backend("cpu"):
            up.reset_counters()
            got = up(tokens)
    torch.testing.assert_close(got, expected)
    assert int(up.zeros_seen) == zeros > 0


@pytest.mark.slow  # compiles the decode step (tens of seconds on two cores)
def test_compiled_decode_equals_eager(calibration_blocks):
    from moefy.decoding import StaticDecoder

    model = tiny_model("llama").eval()
    sparsify_(model, RotateConfig(sparsity=0.5, attention=True, **FAST), calibration_blocks)
    prompt = tiny_inputs("llama", batch=1, seq=5)["input_ids"]
    torch._dynamo.reset()
    with use_backend("cpu"):
        expected = StaticDecoder(model, max_length=12, compile=False).generate(prompt, 4)
        got = StaticDecoder(model, max_length=12).generate(prompt, 4)
    assert torch.equal(got, expected)


def test_save_load_and_unsparsify(calibration_blocks, tmp_path):
    model = tiny_model("llama")
    dense = _outputs(model)
    originals = {name: module for name, module in model.named_modules()}
    sparsify_(model, RotateConfig(sparsity=0.5, attention=True, **FAST), calibration_blocks)
    sparse = _outputs(model)
    assert not torch.allclose(sparse, dense)
    loaded = load_sparse(save_sparse(model, tmp_path / "rotated"))
    torch.testing.assert_close(_outputs(loaded), sparse, **EXACT)
    for path, wrapper in _rotated(loaded).items():
        torch.testing.assert_close(wrapper.rotation, _rotated(model)[path].rotation, **EXACT)
    unsparsify(model)
    assert not list(sparse_modules(model))
    for name, module in model.named_modules():
        assert originals[name] is module
    torch.testing.assert_close(_outputs(model), dense, **EXACT)


def test_reused_calibration_sets_the_rotations_on_a_fresh_model(calibration_blocks):
    config = RotateConfig(sparsity=0.5, greedy=False, **FAST)
    first = tiny_model("llama")
    calibration = sparsify_(first, config, calibration_blocks).calibration
    assert set(calibration.buffers) == set(_rotated(first))
    fresh = tiny_model("llama")
    sparsify_(fresh, config, None, calibration=calibration)
    for path, wrapper in _rotated(fresh).items():
        torch.testing.assert_close(wrapper.rotation, _rotated(first)[path].rotation, **EXACT)
    torch.testing.assert_close(_outputs(fresh), _outputs(first), **EXACT)


def test_measured_flops_count_the_rotation_once_per_input(calibration_blocks):
    model = tiny_model("llama")
    sparsify_(model, RotateConfig(sparsity=0.5, greedy=False, **FAST), calibration_blocks)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.overhead_weights + mlp.up_proj.overhead_weights == D * D
    assert isinstance(mlp.down_proj, ThresholdLinear) and mlp.down_proj.overhead_weights == 0
    model(**tiny_inputs("llama"))
    for wrapper in (mlp.gate_proj, mlp.up_proj):
        tokens, zeros = int(wrapper.tokens_seen), int(wrapper.zeros_seen)
        dense = (2 * D * FFN_WIDTH + FFN_WIDTH) * tokens  # llama tiny has mlp_bias
        expected = dense - 2 * (zeros * FFN_WIDTH - wrapper.overhead_weights * tokens)
        assert zeros > 0 and wrapper.measured_cost().flops == pytest.approx(expected)


class _Quantized(nn.Module):
    """Stands in for a layer whose weight is not a float matrix read as x W^T."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.int8), requires_grad=False)

    def forward(self, x):
        return x @ self.weight.float().T


@pytest.mark.parametrize(
    ("name", "change", "attention", "match"),
    [
        ("llama", "quantized", False, r"layers\.0\.mlp\.gate_proj \(_Quantized\)"),
        ("t5", None, True, r"EncDecAttention\.k.*attention=False"),
    ],
)
def test_inputs_that_cannot_be_folded_are_refused(
    name, change, attention, match, calibration_blocks
):
    model = tiny_model(name)
    if change == "quantized":
        model.model.layers[0].mlp.gate_proj = _Quantized(model.model.layers[0].mlp.gate_proj)
    config = RotateConfig(sparsity=0.5, attention=attention, **FAST)
    with pytest.raises(MoefyError, match=match) as err:
        sparsify_(model, config, calibration_blocks)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["rotate", "lowrank"])
def test_centring_is_refused_where_the_wrappers_do_not_centre(method):
    from moefy.sparsify import config_from_dict

    with pytest.raises(MoefyError, match="does not combine with centring"):
        config_from_dict({"method": method, "centre": "mode"})
    assert config_from_dict({"method": "teal", "centre": "mode"}).centre == "mode"
