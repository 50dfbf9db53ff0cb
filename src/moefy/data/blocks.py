"""Token blocks: the unit of text every verb consumes.

Shape legend:
    N: number of blocks, T: block length in tokens, B: batch of blocks
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moefy.errors import MoefyError


@dataclass(frozen=True)
class TokenBlocks:
    """Fixed-length blocks of token ids cut from one split of a text source.

    Attributes:
        input_ids: (N, T) int64 token ids; each row is a contiguous window of the text.
        source: name of the text source (``bbc-news``, a file path, ...).
        split: ``"calibration"`` or ``"evaluation"``.
    """

    input_ids: torch.Tensor
    source: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.numel() == 0:
            raise MoefyError(
                "TokenBlocks needs a non-empty (blocks, block_len) tensor of token ids"
            )

    @property
    def num_blocks(self) -> int:
        return self.input_ids.shape[0]

    @property
    def block_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def shard(self, rank: int, world: int) -> TokenBlocks:
        """The blocks of one rank: a disjoint, strided share (rank r takes r, r+world, ...)."""
        if world <= 1:
            return self
        return (
            TokenBlocks(self.input_ids[rank::world], self.source, self.split)
            if rank < self.num_blocks
            else _empty_like(self)
        )

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield (B, T) batches in order; the last may be smaller."""
        if batch_size < 1:
            raise MoefyError(f"batch size must be >= 1, got {batch_size}")
        for start in range(0, self.num_blocks, batch_size):
            yield self.input_ids[start : start + batch_size]  # (B, T)


def _empty_like(blocks: TokenBlocks) -> TokenBlocks:
    """A shard with no blocks (more ranks than blocks); bypasses the non-empty check."""
    empty = object.__new__(TokenBlocks)
    object.__setattr__(empty, "input_ids", blocks.input_ids[:0])
    object.__setattr__(empty, "source", blocks.source)
    object.__setattr__(empty, "split", blocks.split)
    return empty
