"""Perplexity of a causal language model on token blocks.

Token-weighted: the next-token negative log-likelihoods of every predicted position of every block
are summed and divided by their count, so the figure does not depend on how blocks are batched or
sharded. Under ``torch.distributed`` each rank scores its shard and the float64 sums are
all-reduced: every rank returns what one process would.

Shape legend:
    B: batch of blocks, T: block length, V: vocabulary size
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.dist import all_reduce_sum_, rank_and_world
from moefy.errors import MoefyError
from moefy.models.load import is_causal_lm

DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on token blocks.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean next-token negative log-likelihood in nats over all predicted positions.
        n_tokens: number of predicted positions (``blocks * (block_len - 1)``).
    """

    perplexity: float
    nll: float
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return asdict(self)


def perplexity(
    model: nn.Module,
    data: TokenBlocks,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> PerplexityResult:
    """Token-weighted perplexity of a causal LM on ``data``.

    Each block is scored on its own: position t predicts token t + 1, so a block of T tokens gives
    T - 1 predictions. Logits are cast to float32 before the log-softmax and sums are kept in
    float64. The model runs in eval mode under ``torch.no_grad``; its previous mode is restored.

    Args:
        model: a causal language model (``...ForCausalLM``, ``GPT2LMHeadModel``, ...).
        data: token blocks, e.g. ``load_text().blocks(tokenizer, "evaluation")``.
        batch_size: blocks per forward pass.
        progress: show a progress bar (rank 0 only).

    Returns:
        The perplexity, mean NLL and number of predicted tokens over all ranks.

    Raises:
        MoefyError: the model is not a causal LM, or blocks are shorter than 2 tokens.

    Example:
        >>> model, tokenizer = load_model("smollm2-135m")
        >>> data = load_text("bbc-news").blocks(tokenizer, "evaluation", n_tokens=8192)
        >>> round(perplexity(model, data).perplexity)
        31
    """
    if not is_causal_lm(model):
        raise MoefyError(
            f"perplexity needs a causal language model, got {type(model).__name__}: "
            "encoder-only and encoder-decoder models have no next-token predictions"
        )
    if data.block_len < 2:
        raise MoefyError(f"perplexity needs blocks of at least 2 tokens, got {data.block_len}")
    if batch_size < 1:
        raise MoefyError(f"batch size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    rank, world = rank_and_world()
    shard = data.shard(rank, world)
    device = next(model.parameters()).device
    # [sum of NLL, number of predictions]; float64 so the sum does not depend on the sharding.
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = tqdm(
                shard.batches(batch_size),
                total=math.ceil(shard.num_blocks / batch_size),
                desc="perplexity",
                unit="batch",
                disable=not progress or rank != 0,
            )
            for input_ids in batches:
                input_ids = input_ids.to(device)  # (B, T)
                logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
                logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts t + 1
                targets = input_ids[:, 1:]  # (B, T-1)
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
                )  # (B * (T-1),)
                totals[0] += nll.double().sum()
                totals[1] += targets.numel()
    finally:
        model.train(was_training)
    all_reduce_sum_(totals)
    n_tokens = int(totals[1].item())
    mean_nll = totals[0].item() / n_tokens
    return PerplexityResult(perplexity=math.exp(mean_nll), nll=mean_nll, n_tokens=n_tokens)
