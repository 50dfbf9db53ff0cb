"""Shared helpers for the MoEfication tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

# One tolerance table per dtype for "equals the dense model" checks.
TOLERANCE = {torch.float32: {"atol": 2e-5, "rtol": 1e-4}}


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The main output tensor of a tiny model: logits, or the last hidden state."""
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


class FakeProfile:
    """Stands in for ``SparsityProfile``: a fingerprint and per-layer co-activation counts."""

    def __init__(self, fingerprint: dict, coactivations: list[torch.Tensor]) -> None:
        self.fingerprint = fingerprint
        self._coactivations = coactivations

    def coactivation(self, layer_index: int) -> torch.Tensor:
        return self._coactivations[layer_index]


@pytest.fixture
def run() -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    return model_output


@pytest.fixture
def fp32() -> dict[str, float]:
    return TOLERANCE[torch.float32]


@pytest.fixture
def fake_profile() -> type[FakeProfile]:
    return FakeProfile
