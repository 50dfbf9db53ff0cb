"""The share of exact zeros among FFN activations: the figure ReLUfication raises.

The activations are the outputs of each FFN's activation function (for gated FFNs ``act(gate)``,
the factor a ReLU makes exactly zero), of dense FFN sites and of moefied layers alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.dist import all_reduce_sum_, rank_and_world


def activation_modules(model: nn.Module) -> list[nn.Module]:
    """The activation-function module of every FFN, in layer order, each once.

    Dense FFN sites give ``site.part("act")``; a moefied model gives each :class:`MoEFFN`'s
    ``act`` (whose gate activations cover every expert that runs).
    """
    from moefy.arch.registry import find_ffns
    from moefy.moe.convert import moe_layers

    layers = moe_layers(model)
    found = [moe.act for moe in layers] if layers else [s.part("act") for s in find_ffns(model)]
    unique: dict[int, nn.Module] = {}
    for module in found:
        unique.setdefault(id(module), module)
    return list(unique.values())


@contextlib.contextmanager
def hook_activations(model: nn.Module, keep: Callable[[torch.Tensor], Any]) -> Iterator[None]:
    """Call ``keep(output)`` with every FFN activation output while the block runs."""
    handles = [
        module.register_forward_hook(lambda _m, _a, output: keep(output))
        for module in activation_modules(model)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ZeroCounter:
    """Exact zeros and entries among the FFN activations seen (see :func:`count_zeros`)."""

    def __init__(self) -> None:
        self.counts = torch.zeros(2, dtype=torch.float64)  # [zeros, entries]

    def add(self, output: torch.Tensor) -> None:
        self.counts[0] += int((output == 0).sum())
        self.counts[1] += output.numel()

    def share(self, *, reduce: bool = True) -> float:
        """Share of exact zeros (summed over ranks when ``reduce``); nan before any entry."""
        counts = self.counts.clone()
        if reduce:
            all_reduce_sum_(counts)
        return float(counts[0] / counts[1]) if counts[1] else float("nan")


@contextlib.contextmanager
def count_zeros(model: nn.Module) -> Iterator[ZeroCounter]:
    """Count exact zeros of the FFN activations of every forward inside the block.

    Example:
        >>> with count_zeros(model) as zeros:
        ...     result = perplexity(model, blocks)
        >>> zeros.share()
    """
    counter = ZeroCounter()
    with hook_activations(model, counter.add):
        yield counter


def exact_zero_share(model: nn.Module, blocks: TokenBlocks, batch_size: int = 8) -> float:
    """Share of FFN activation outputs (all layers, tokens and neurons) that are exactly 0.

    Runs ``blocks`` through ``model`` (this rank's shard; counts summed over ranks).

    Example:
        >>> exact_zero_share(model, eval_blocks)  # SiLU: ~0.0; after relufy_: ~0.5 and up
    """
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with count_zeros(model) as zeros, torch.no_grad():
            for input_ids in blocks.shard(rank, world).batches(batch_size):
                model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        model.train(was_training)
    return zeros.share()
