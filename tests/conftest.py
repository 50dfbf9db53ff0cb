"""Suite-wide set-up: Triton's interpreter for the kernel tests on machines without a GPU, and
the CLI's default progress output whatever the environment says."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from moefy.cli.show import PROGRESS_ENV
from moefy.kernels.backend import INTERPRET_ENV


def pytest_configure(config: pytest.Config) -> None:
    """Let the triton tests interpret kernels on CPU tensors where there is no GPU.

    Triton reads ``TRITON_INTERPRET`` once, when it is imported, so it is set here, before any
    test imports it; where CUDA is present the ``gpu`` tests run the compiled kernels instead.
    Only the triton backend and the tests look at it: ``auto`` never interprets.
    """
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault(INTERPRET_ENV, "1")


@pytest.fixture(autouse=True)
def _default_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests read the CLI's stderr: progress lines (``MOEFY_PROGRESS=lines``, which
    benchmarks/gpu_session.sh sets for its own commands) must not land there."""
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
