"""The share of exact zeros among FFN activations on some text: the figure ReLUfication raises."""

from __future__ import annotations

import torch
from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.dist import all_reduce_sum_, rank_and_world


def exact_zero_share(model: nn.Module, blocks: TokenBlocks, batch_size: int = 8) -> float:
    """Share of FFN activation outputs (all layers, tokens and neurons) that are exactly 0.

    Runs ``blocks`` through ``model`` (this rank's shard; counts summed over ranks).

    Example:
        >>> exact_zero_share(model, eval_blocks)  # SiLU: ~0.0; after relufy_: ~0.5 and up
    """
    from moefy.arch.registry import find_ffns

    counts = torch.zeros(2, dtype=torch.float64)  # [zeros, entries]

    def count(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
        counts[0] += int((output == 0).sum())
        counts[1] += output.numel()

    handles = [site.part("act").register_forward_hook(count) for site in find_ffns(model)]
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for input_ids in blocks.shard(rank, world).batches(batch_size):
                model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    all_reduce_sum_(counts)
    return float(counts[0] / counts[1]) if counts[1] else float("nan")
