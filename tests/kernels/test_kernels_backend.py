"""The backend switch: names, availability errors, and auto's one-line fallback warning."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.kernels import (
    Backend,
    KernelFallbackWarning,
    activation_name,
    expert_ffn,
    get_backend,
    set_backend,
    threshold_linear,
    transposed_weight,
    use_backend,
)
from moefy.kernels import backend as kernel_backend
from moefy.kernels.build import NO_BUILD_ENV, library_name


def _case():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, generator=gen)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    return x, mask, torch.randn(3, 8, 16, generator=gen), torch.randn(3, 4, 16, generator=gen)


def test_unknown_backend_is_a_one_line_error():
    with pytest.raises(MoefyError, match="unknown kernel backend 'fast'.*auto, reference"):
        set_backend("fast")


def test_environment_sets_the_default(monkeypatch):
    monkeypatch.setenv(kernel_backend.BACKEND_ENV, "reference")
    assert get_backend() is Backend.REFERENCE
    with use_backend("auto"):
        assert get_backend() is Backend.AUTO
    assert get_backend() is Backend.REFERENCE


def test_triton_without_gpu_says_what_to_do(monkeypatch):
    monkeypatch.setattr(kernel_backend, "triton_available", lambda: False)
    monkeypatch.delenv(kernel_backend.INTERPRET_ENV, raising=False)
    with pytest.raises(MoefyError, match="needs a CUDA GPU and the triton package"):
        set_backend("triton")
    x, mask, w_in, w_out = _case()
    with pytest.raises(MoefyError, match="triton") as caught:
        expert_ffn(x, mask, w_in, w_out, None, None, "silu", True, backend="triton")
    assert "\n" not in str(caught.value) and "moefy[triton]" in str(caught.value)


def test_triton_not_installed_is_an_error_even_when_interpreting(monkeypatch):
    monkeypatch.setattr(kernel_backend, "triton_installed", lambda: False)
    monkeypatch.setenv(kernel_backend.INTERPRET_ENV, "1")
    with pytest.raises(MoefyError, match="triton package"):
        set_backend("triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto takes triton on CUDA tensors")
def test_moefy_and_cpu_kernels_work_without_triton():
    """With triton unimportable, moefy imports, and auto and reference run on CPU tensors."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, moefy, moefy.kernels as k\n"
        "x, w = torch.randn(2, 8), torch.randn(8, 4)\n"
        "for backend in ('auto', 'reference'):\n"
        "    y = k.threshold_linear(x, w, None, torch.tensor(0.5), backend=backend)\n"
        "    assert y.shape == (2, 4)\n"
        "from moefy.kernels.backend import triton_available\n"
        "print(triton_available(), 'triton' in sys.modules and sys.modules['triton'] is not None)\n"
    )
    env = {**os.environ, NO_BUILD_ENV: "1"}  # the reference fallback is enough here
    env.pop(kernel_backend.INTERPRET_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def _simulate_no_compiler(monkeypatch):
    monkeypatch.setenv(NO_BUILD_ENV, "1")
    kernel_backend.reset_state()


def test_auto_without_compiler_falls_back_with_one_warning(monkeypatch):
    _simulate_no_compiler(monkeypatch)
    x, mask, w_in, w_out = _case()
    expected = expert_ffn(x, mask, w_in, w_out, None, None, "silu", True, backend="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            got = expert_ffn(x, mask, w_in, w_out, None, None, "silu", True)
            threshold_linear(x, w_in[0].t(), None, torch.tensor(0.1))
    fallbacks = [w for w in caught if issubclass(w.category, KernelFallbackWarning)]
    assert len(fallbacks) == 1
    message = str(fallbacks[0].message)
    assert "\n" not in message and NO_BUILD_ENV in message
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_cpu_without_compiler_is_an_error(monkeypatch):
    _simulate_no_compiler(monkeypatch)
    with pytest.raises(MoefyError, match="cpu kernels cannot run here.*reference backend"):
        set_backend("cpu")


def test_reference_backend_never_warns(monkeypatch):
    _simulate_no_compiler(monkeypatch)
    x, mask, w_in, w_out = _case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with use_backend("reference"):
            expert_ffn(x, mask, w_in, w_out, None, None, "relu", True)


def test_library_name_depends_on_source_and_torch(monkeypatch):
    name = library_name()
    assert name.startswith("moefy_cpu_") and name == library_name()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert library_name() != name


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.SiLU(), "silu"),
        (nn.ReLU(), "relu"),
        (nn.GELU(), "gelu_erf"),
        (nn.GELU(approximate="tanh"), "gelu_tanh"),
        (nn.Tanh(), None),
        (nn.Identity(), None),
    ],
)
def test_activation_found_by_what_it_computes(module, expected):
    assert activation_name(module) == expected


def test_transformers_activations_are_recognised():
    from transformers.activations import ACT2FN

    assert activation_name(ACT2FN["silu"]) == "silu"
    assert activation_name(ACT2FN["gelu_new"]) == "gelu_tanh"
    assert activation_name(ACT2FN["gelu"]) == "gelu_erf"
    assert activation_name(ACT2FN["relu2"]) is None  # ReLU squared: torch path


def test_transposed_weight_follows_in_place_edits():
    layer = nn.Linear(5, 3)
    first = transposed_weight(layer)
    assert first.shape == (5, 3) and first.is_contiguous()
    assert transposed_weight(layer) is first  # cached
    with torch.no_grad():
        layer.weight.mul_(2.0)
    torch.testing.assert_close(transposed_weight(layer), layer.weight.t())
