"""Evaluation: perplexity, agreement with dense, classification and measured cost on one harness.

Example:
    >>> from moefy.eval import EvalConfig, dense_reference, evaluate
    >>> report = evaluate(model, EvalConfig(tasks=("perplexity", "bbc-topic")), tokenizer)
    >>> report.row()["perplexity"], report.cost.ffn_flops_per_token
"""

from moefy.eval.agreement import DenseReference, LMScores, dense_reference, score_lm
from moefy.eval.classify import (
    CLASSIFICATION_TASKS,
    ClassificationResult,
    ClassificationTask,
    classify,
)
from moefy.eval.config import TASKS, EvalConfig
from moefy.eval.cost import Cost, measure_cost
from moefy.eval.harness import EvalReport, evaluate, evaluation_blocks
from moefy.eval.perplexity import PerplexityResult, perplexity

__all__ = [
    "CLASSIFICATION_TASKS",
    "ClassificationResult",
    "ClassificationTask",
    "Cost",
    "DenseReference",
    "EvalConfig",
    "EvalReport",
    "LMScores",
    "PerplexityResult",
    "TASKS",
    "classify",
    "dense_reference",
    "evaluate",
    "evaluation_blocks",
    "lm_eval_model",
    "measure_cost",
    "perplexity",
    "score_lm",
]


def __getattr__(name: str):
    # lm-eval is an optional extra: import it only when asked for.
    if name == "lm_eval_model":
        from moefy.eval.lm_eval import lm_eval_model

        return lm_eval_model
    raise AttributeError(f"module 'moefy.eval' has no attribute {name!r}")
