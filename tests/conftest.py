"""Suite-wide set-up: Triton's interpreter for the kernel tests on machines without a GPU."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from moefy.kernels.backend import INTERPRET_ENV


def pytest_configure(config: pytest.Config) -> None:
    """Let the triton tests interpret kernels on CPU tensors where there is no GPU.

    Triton reads ``TRITON_INTERPRET`` once, when it is imported, so it is set here, before any
    test imports it; where CUDA is present the ``gpu`` tests run the compiled kernels instead.
    Only the triton backend and the tests look at it: ``auto`` never interprets.
    """
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault(INTERPRET_ENV, "1")
