"""``evaluate``: every quality and cost measure of one model, on one config.

The same call rates a dense, moefied, routed, sparsified or layer-dropped model, so results of
different methods are comparable: same text, same blocks, same counting of FLOPs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError, check_config
from moefy.eval.agreement import DenseReference, LMScores, score_lm
from moefy.eval.classify import CLASSIFICATION_TASKS, ClassificationResult, classify
from moefy.eval.config import EvalConfig
from moefy.eval.cost import Cost, measure_cost
from moefy.models.load import is_causal_lm


@dataclass(frozen=True)
class EvalReport:
    """What :func:`evaluate` measured.

    Attributes:
        config: the evaluation config.
        cost: measured FLOPs and weight bytes per token (on the evaluation text).
        lm: perplexity and agreement (causal LMs), else None.
        classification: task name -> result.
        dense_cost: the dense model's cost from the reference, when one was given.
        seconds: wall-clock time of the evaluation.
    """

    config: EvalConfig
    cost: Cost
    lm: LMScores | None = None
    classification: dict[str, ClassificationResult] = field(default_factory=dict)
    dense_cost: Cost | None = None
    seconds: float = 0.0

    @property
    def ffn_flops_fraction(self) -> float | None:
        """FFN FLOPs spent over the dense model's (needs ``dense_cost``)."""
        if self.dense_cost is None or self.dense_cost.ffn_flops_per_token == 0:
            return None
        return self.cost.ffn_flops_per_token / self.dense_cost.ffn_flops_per_token

    @property
    def linear_flops_fraction(self) -> float | None:
        """Linear FLOPs of the transformer blocks (FFN and attention projections; embedding and
        LM head left out) spent over the dense model's (needs ``dense_cost``)."""
        if self.dense_cost is None or self.dense_cost.attention_flops_per_token == 0:
            return None  # no attention counted (an older cached row): not a linear figure
        return self.cost.block_linear_flops_per_token / self.dense_cost.block_linear_flops_per_token

    def row(self) -> dict[str, Any]:
        """One flat, JSON-ready row: the figures a table or plot needs."""
        row: dict[str, Any] = {
            "ffn_flops_per_token": self.cost.ffn_flops_per_token,
            "total_flops_per_token": self.cost.total_flops_per_token,
            "weight_bytes_per_token": self.cost.weight_bytes_per_token,
            "ffn_flops_fraction": self.ffn_flops_fraction,
            "linear_flops_fraction": self.linear_flops_fraction,
        }
        if self.lm is not None:
            row.update(
                perplexity=self.lm.perplexity,
                nll=self.lm.nll,
                eval_tokens=self.lm.n_tokens,
                top1_agreement=self.lm.top1_agreement,
                kl_to_dense=self.lm.kl_to_dense,
            )
        for name, result in self.classification.items():
            row[f"{name}_accuracy"] = result.accuracy
            row[f"{name}_chance"] = result.chance
        return row

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with every detail."""
        return {
            "config": self.config.to_dict(),
            "cost": self.cost.to_dict(),
            "dense_cost": None if self.dense_cost is None else self.dense_cost.to_dict(),
            "lm": None if self.lm is None else self.lm.to_dict(),
            "classification": {k: v.to_dict() for k, v in self.classification.items()},
            "seconds": self.seconds,
            "row": self.row(),
        }


def evaluation_blocks(tokenizer: Any, config: EvalConfig) -> TokenBlocks:
    """The evaluation blocks ``config`` names (evaluation split of ``config.data``)."""
    from moefy.data.text import load_text

    if tokenizer is None:
        raise MoefyError("evaluation needs the model's tokenizer to cut the text into blocks")
    return load_text(config.data).blocks(
        tokenizer, split="evaluation", block_len=config.block_len, n_tokens=config.tokens
    )


def _encoder_cost(model: nn.Module, blocks: TokenBlocks, batch_size: int) -> Cost:
    device = next(model.parameters()).device
    with torch.no_grad(), measure_cost(model) as meter:
        for input_ids in blocks.batches(batch_size):
            model(input_ids=input_ids.to(device))
            meter.add_tokens(input_ids.numel())
    return meter.result()


def evaluate(
    model: nn.Module,
    config: EvalConfig | None = None,
    tokenizer: Any = None,
    *,
    reference: DenseReference | None = None,
    blocks: TokenBlocks | None = None,
    progress: bool = False,
) -> EvalReport:
    """Measure quality and cost of ``model`` as ``config`` says.

    Causal LMs always get perplexity (the pass that also measures cost); ``agreement`` compares
    with a dense reference; classification tasks score zero-shot (decoders) or with a linear probe
    (encoders).

    Args:
        model: a dense, moefied, routed, sparsified or layer-dropped model.
        config: what to measure (default :class:`EvalConfig`).
        tokenizer: the model's tokenizer (needed unless ``blocks`` is given and no
            classification task is asked for).
        reference: the dense model's log-probabilities (:func:`moefy.eval.dense_reference`),
            needed for ``agreement`` and for ``ffn_flops_fraction``.
        blocks: evaluation blocks to use instead of cutting ``config.data``.
        progress: show progress bars.

    Returns:
        An :class:`EvalReport`.

    Raises:
        MoefyError: ``agreement`` without a reference, a missing tokenizer, a task the model
            cannot do.

    Example:
        >>> ref = dense_reference(model, blocks, 2048)
        >>> ref.cost = evaluate(model, blocks=blocks).cost
        >>> moefy_(model, MoEfyConfig(num_experts=64)); set_selection(model, keep=0.25)
        >>> evaluate(model, EvalConfig(tasks=("perplexity", "agreement")), tok,
        ...          reference=ref, blocks=blocks).row()
    """
    config = EvalConfig() if config is None else config
    check_config(config, EvalConfig)
    start = time.perf_counter()
    if "agreement" in config.tasks and reference is None:
        raise MoefyError(
            "the agreement task needs the dense model's outputs: pass "
            "reference=moefy.eval.dense_reference(dense_model, blocks, n_tokens)"
        )
    if blocks is None:
        blocks = evaluation_blocks(tokenizer, config)
    lm, cost = _lm_scores_and_cost(model, blocks, config, reference, progress)
    return EvalReport(
        config=config,
        cost=cost,
        lm=lm,
        classification=_classification(model, tokenizer, config),
        dense_cost=None if reference is None else reference.cost,
        seconds=time.perf_counter() - start,
    )


def _lm_scores_and_cost(
    model: nn.Module,
    blocks: TokenBlocks,
    config: EvalConfig,
    reference: DenseReference | None,
    progress: bool,
) -> tuple[LMScores | None, Cost]:
    """Perplexity (and agreement, when asked) with the cost of that pass for a causal LM; the
    cost of a plain forward pass, and no scores, for an encoder."""
    if is_causal_lm(model):
        agreement = reference if "agreement" in config.tasks else None
        return score_lm(model, blocks, config.batch_size, agreement, progress)
    if "perplexity" in config.tasks and len(config.tasks) == 1:
        raise MoefyError(
            f"{type(model).__name__} is not a causal LM: perplexity does not apply; ask for "
            f"a classification task ({', '.join(CLASSIFICATION_TASKS)})"
        )
    return None, _encoder_cost(model, blocks, config.batch_size)


def _classification(
    model: nn.Module, tokenizer: Any, config: EvalConfig
) -> dict[str, ClassificationResult]:
    """Each classification task of ``config.tasks``, by name."""
    return {
        task: classify(
            model,
            tokenizer,
            task,
            examples=config.classify_examples,
            probe_examples=config.probe_examples,
            max_doc_tokens=config.max_doc_tokens,
            batch_size=config.batch_size,
            seed=config.seed,
        )
        for task in config.tasks
        if task in CLASSIFICATION_TASKS
    }
