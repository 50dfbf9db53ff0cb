"""The finetune schedule: learning rate, progress through the budget, when to stop, and the
resumable order in which a rank visits its blocks.
"""

from __future__ import annotations

import math

import torch

from moefy.finetune.config import FinetuneConfig


def lr_at(config: FinetuneConfig, step: int, progress: float) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def budget_progress(config: FinetuneConfig, steps: int, tokens: int, seconds: float) -> float:
    used = []
    if config.max_steps is not None:
        used.append(steps / config.max_steps)
    if config.max_tokens is not None:
        used.append(tokens / config.max_tokens)
    if config.minutes is not None:
        used.append(seconds / (60.0 * config.minutes))
    return max(used)


def stopped_by(config: FinetuneConfig, steps: int, tokens: int, seconds: float) -> str | None:
    if config.max_steps is not None and steps >= config.max_steps:
        return "max_steps"
    if config.max_tokens is not None and tokens >= config.max_tokens:
        return "max_tokens"
    if config.minutes is not None and seconds >= 60.0 * config.minutes:
        return "minutes"
    return None


class BlockOrder:
    """The seeded order of this rank's blocks, epoch after epoch; its position is resumable."""

    def __init__(self, n_blocks: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.n_blocks, self.seed, self.epoch, self.position = n_blocks, seed, epoch, position
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n_blocks, generator=gen).tolist()

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position >= self.n_blocks:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self._perm[self.position])
            self.position += 1
        return out
