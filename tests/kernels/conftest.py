"""Shared helpers of the kernel tests: tolerances and a clean backend state per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from moefy.kernels import backend as kernel_backend

# One tolerance table per dtype: the kernels sum in another order than torch.
TOLERANCE = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}}
# Largest ||out - ref|| / ||ref|| against a float64 reference on the same (upcast) inputs, per
# input dtype (float32 far under 1e-3; 16-bit outputs round at 1e-3 to 1e-2).
RELATIVE_ERROR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def fp32() -> dict[str, float]:
    return TOLERANCE[torch.float32]


@pytest.fixture(autouse=True)
def fresh_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts from auto with no remembered build error or warning."""
    monkeypatch.delenv(kernel_backend.BACKEND_ENV, raising=False)
    saved = dict(kernel_backend._state)
    kernel_backend._state.update(backend=None, warned=False)
    if kernel_backend._state["error"] is not None:  # a fallback test left its error behind
        kernel_backend._state.update(extension=None, error=None)
    yield
    kernel_backend._state.update(saved)


@pytest.fixture
def relative_error() -> dict[torch.dtype, float]:
    return RELATIVE_ERROR
