"""Language-model scores in one pass: perplexity, and agreement with the dense model.

Agreement compares the evaluated model's next-token distributions with the dense model's on the
same blocks: the share of positions whose top-1 token is the same, and the mean
``KL(p_dense || p_model)`` in nats. The dense log-probabilities are taken once
(:func:`dense_reference`) and kept as float16, so evaluating many methods needs one dense pass.

Shape legend:
    B: batch of blocks, T: block length, V: vocabulary, P: predicted positions (B * (T - 1))
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
from moefy.eval.cost import Cost, measure_cost
from moefy.eval.perplexity import check_blocks, finite_perplexity
from moefy.models.load import is_causal_lm

REFERENCE_DTYPE = torch.float16


@dataclass
class DenseReference:
    """The dense model's next-token log-probabilities on the first blocks of the evaluation text.

    Attributes:
        input_ids: (N, T) the blocks they were taken on (this rank's shard).
        log_probs: (N, T - 1, V) float16 log-probabilities.
        cost: the dense model's cost on the full evaluation text, when measured.
    """

    input_ids: torch.Tensor
    log_probs: torch.Tensor
    cost: Cost | None = None

    @property
    def num_blocks(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class LMScores:
    """Perplexity and agreement of one model.

    Attributes:
        perplexity: ``exp(nll)`` on the evaluation blocks.
        nll: mean next-token negative log-likelihood in nats.
        n_tokens: predicted positions scored for perplexity.
        top1_agreement: share of compared positions whose argmax equals the dense one, or None.
        kl_to_dense: mean KL(dense || model) in nats over compared positions, or None.
        agreement_tokens: positions compared with the dense model (0 without a reference).
    """

    perplexity: float
    nll: float
    n_tokens: int
    top1_agreement: float | None
    kl_to_dense: float | None
    agreement_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _check_causal(model: nn.Module, blocks: TokenBlocks) -> None:
    if not is_causal_lm(model):
        raise MoefyError(
            f"perplexity and agreement need a causal language model, got {type(model).__name__}; "
            "use the classification tasks for encoders"
        )
    check_blocks(blocks)
    if blocks.block_len < 2:
        raise MoefyError(
            f"language-model scores need blocks of >= 2 tokens, not {blocks.block_len}"
        )


def _log_probs(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T - 1, V) float32 next-token log-probabilities."""
    logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def dense_reference(
    model: nn.Module, blocks: TokenBlocks, n_tokens: int, batch_size: int = 8
) -> DenseReference:
    """Take the dense model's log-probabilities on the first ``n_tokens`` tokens of ``blocks``.

    Args:
        model: the dense causal LM (before any moefy change).
        blocks: the evaluation blocks every method will be scored on.
        n_tokens: tokens to keep (rounded up to whole blocks); memory is ``n * V * 2`` bytes.
        batch_size: blocks per forward.

    Returns:
        A :class:`DenseReference` for :func:`score_lm` (``cost`` is left for the caller).

    Example:
        >>> ref = dense_reference(model, blocks, n_tokens=2048)
    """
    _check_causal(model, blocks)
    rank, world = rank_and_world()
    n_blocks = min(blocks.num_blocks, max(1, math.ceil(n_tokens / blocks.block_len)))
    head = TokenBlocks(blocks.input_ids[:n_blocks], blocks.source, blocks.split).shard(rank, world)
    device = next(model.parameters()).device
    parts = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for input_ids in head.batches(batch_size):
                parts.append(_log_probs(model, input_ids.to(device)).to(REFERENCE_DTYPE).cpu())
    finally:
        model.train(was_training)
    vocab = parts[0].shape[-1] if parts else 0
    log_probs = torch.cat(parts) if parts else torch.empty(0, head.block_len - 1, vocab)
    return DenseReference(input_ids=head.input_ids.clone(), log_probs=log_probs)


def score_lm(
    model: nn.Module,
    blocks: TokenBlocks,
    batch_size: int = 8,
    reference: DenseReference | None = None,
    progress: bool = False,
) -> tuple[LMScores, Cost]:
    """Perplexity, agreement with the dense model and measured cost, in one pass.

    Each rank scores its shard of ``blocks``; float64 sums are all-reduced so every rank returns
    what one process would (the reference must come from the same sharding, as
    :func:`dense_reference` takes it).

    Args:
        model: a causal LM: dense, moefied, routed, sparsified or with layers dropped.
        blocks: evaluation blocks.
        batch_size: blocks per forward pass.
        reference: the dense model's log-probabilities on the first blocks, for agreement.
        progress: show a progress bar (rank 0).

    Returns:
        ``(LMScores, Cost)``.

    Example:
        >>> scores, cost = score_lm(model, blocks, reference=dense_reference(dense, blocks, 2048))
    """
    _check_causal(model, blocks)
    if batch_size < 1:
        raise MoefyError(f"batch size must be >= 1, got {batch_size}")
    rank, world = rank_and_world()
    shard = blocks.shard(rank, world)
    device = next(model.parameters()).device
    _check_reference(reference, shard)
    was_training = model.training
    model.eval()
    try:
        totals, cost = _score_shard(
            model, shard, batch_size, reference, device, progress=progress and rank == 0
        )
    finally:
        model.train(was_training)
    all_reduce_sum_(totals)
    return _lm_scores(totals), _reduce_cost(cost, device)


def _check_reference(reference: DenseReference | None, shard: TokenBlocks) -> None:
    """The reference must have been taken on the first blocks of this rank's shard."""
    if reference is None or not reference.num_blocks:
        return
    if not torch.equal(reference.input_ids, shard.input_ids[: reference.num_blocks]):
        raise MoefyError(
            "the dense reference was taken on other blocks: build it from the same evaluation "
            "text, block length and number of processes"
        )


# the sums score_lm keeps per rank, in float64, as the indices of its (5,) totals
_NLL, _PREDICTED, _TOP1_MATCHES, _KL, _COMPARED = range(5)


def _score_shard(
    model: nn.Module,
    shard: TokenBlocks,
    batch_size: int,
    reference: DenseReference | None,
    device: torch.device,
    *,
    progress: bool,
) -> tuple[torch.Tensor, Cost | None]:
    """This rank's (5,) float64 sums (see ``_NLL`` ...) and measured cost (None without
    tokens), in one no-grad pass over ``shard``."""
    from tqdm.auto import tqdm

    n_ref = 0 if reference is None else reference.num_blocks
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    done = 0
    with torch.no_grad(), measure_cost(model) as meter:
        for input_ids in tqdm(
            shard.batches(batch_size),
            total=math.ceil(shard.num_blocks / batch_size),
            desc="evaluate",
            unit="batch",
            disable=not progress,
        ):
            input_ids = input_ids.to(device)  # (B, T)
            meter.add_tokens(input_ids.numel())
            log_probs = _log_probs(model, input_ids)  # (B, T-1, V)
            targets = input_ids[:, 1:]
            nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            totals[_NLL] += nll.double().sum()
            totals[_PREDICTED] += targets.numel()
            batch = input_ids.shape[0]
            take = max(0, min(batch, n_ref - done))
            if take:
                dense = reference.log_probs[done : done + take].to(device).float()
                _add_agreement(totals, dense, log_probs[:take])
            done += batch
    return totals, meter.result() if meter.tokens else None


def _add_agreement(totals: torch.Tensor, dense: torch.Tensor, mine: torch.Tensor) -> None:
    """Add top-1 matches, KL(dense || mine) and positions compared to ``totals``.

    Args:
        totals: (5,) float64 sums, changed in place.
        dense, mine: (b, T-1, V) log-probabilities of the dense and evaluated models.
    """
    totals[_TOP1_MATCHES] += (dense.argmax(-1) == mine.argmax(-1)).sum().double()
    kl = (dense.exp() * (dense - mine)).sum(-1)  # (b, T-1)
    totals[_KL] += kl.double().sum()
    totals[_COMPARED] += kl.numel()


def _lm_scores(totals: torch.Tensor) -> LMScores:
    """:class:`LMScores` from the (5,) sums of every rank."""
    n_tokens = int(totals[_PREDICTED])
    compared = int(totals[_COMPARED])
    ppl, mean_nll = finite_perplexity(float(totals[_NLL]), n_tokens)
    return LMScores(
        perplexity=ppl,
        nll=mean_nll,
        n_tokens=n_tokens,
        top1_agreement=float(totals[_TOP1_MATCHES]) / compared if compared else None,
        kl_to_dense=float(totals[_KL]) / compared if compared else None,
        agreement_tokens=compared,
    )


def _reduce_cost(cost: Cost | None, device: torch.device) -> Cost:
    """Token-weighted mean of every rank's cost (a rank with no blocks contributes nothing)."""
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    if cost is not None:
        sums += torch.tensor(
            [
                cost.ffn_flops_per_token * cost.tokens,
                cost.other_flops_per_token * cost.tokens,
                cost.weight_bytes_per_token * cost.tokens,
                cost.tokens,
                cost.attention_flops_per_token * cost.tokens,
            ],
            dtype=torch.float64,
            device=device,
        )
    all_reduce_sum_(sums)
    tokens = int(sums[3])
    return Cost(
        ffn_flops_per_token=float(sums[0]) / tokens,
        other_flops_per_token=float(sums[1]) / tokens,
        weight_bytes_per_token=float(sums[2]) / tokens,
        tokens=tokens,
        attention_flops_per_token=float(sums[4]) / tokens,
    )
