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
import sys
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
# the largest mean NLL whose exp is a finite float64 perplexity
MAX_NLL = math.log(sys.float_info.max)


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
        MoefyError: the model is not a causal LM, data that is not (non-empty) token blocks,
            blocks shorter than 2 tokens, or a perplexity that is not finite (nan or inf
            logits).

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
    check_blocks(data)
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
    ppl, mean_nll = finite_perplexity(totals[0].item(), n_tokens)
    return PerplexityResult(perplexity=ppl, nll=mean_nll, n_tokens=n_tokens)


def check_blocks(data: object) -> None:
    """Refuse evaluation data that is not non-empty :class:`TokenBlocks`.

    Raises:
        MoefyError: a list, a tensor, None, or blocks with no tokens.
    """
    if not isinstance(data, TokenBlocks):
        raise MoefyError(
            f"evaluation data must be TokenBlocks (load_text(...).blocks(tokenizer, "
            f"'evaluation')), got {type(data).__name__}"
        )
    if data.num_blocks == 0 or data.block_len == 0:
        raise MoefyError("the evaluation text has no tokens: give more text")


def finite_perplexity(nll_sum: float, n_tokens: int) -> tuple[float, float]:
    """``(perplexity, mean NLL)`` of ``n_tokens`` predictions whose NLLs sum to ``nll_sum``.

    A perplexity that is nan or inf is never a result: it means the model's logits are not
    finite (damaged weights, or a float16 overflow), so it is an error, not a number to print.

    Raises:
        MoefyError: no predictions, or a mean NLL that is nan or too large for a finite exp.

    Example:
        >>> finite_perplexity(2 * math.log(4.0), 2)
        (4.0, 1.3862943611198906)
    """
    if n_tokens <= 0:
        raise MoefyError("the evaluation text gave no predictions: give more text")
    mean_nll = nll_sum / n_tokens
    if not math.isfinite(mean_nll) or mean_nll > MAX_NLL:
        kind = "nan" if math.isnan(mean_nll) else "infinite"
        raise MoefyError(
            f"perplexity is {kind}: the model's logits are not finite on the evaluation text "
            "(damaged weights, or an overflow in float16: try --dtype fp32)"
        )
    return math.exp(mean_nll), mean_nll
