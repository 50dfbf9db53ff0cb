"""Shared fixtures of the sparsify tests: random token blocks for tiny models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from moefy.data.blocks import TokenBlocks
from tiny_models import VOCAB


def _random_blocks(n_blocks: int, block_len: int, seed: int) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    return TokenBlocks(torch.randint(3, VOCAB, (n_blocks, block_len), generator=gen))


@pytest.fixture(scope="session")
def make_blocks() -> Callable[[int, int, int], TokenBlocks]:
    """(n_blocks, block_len, seed) -> random token ids of the tiny vocabulary (no specials)."""
    return _random_blocks


@pytest.fixture(scope="session")
def calibration_blocks() -> TokenBlocks:
    return _random_blocks(32, 32, seed=1)  # 1024 tokens


@pytest.fixture(scope="session")
def held_blocks() -> TokenBlocks:
    return _random_blocks(32, 32, seed=2)


@pytest.fixture(scope="session")
def small_blocks() -> TokenBlocks:
    return _random_blocks(4, 16, seed=3)  # 64 tokens: enough for identity and structure checks
