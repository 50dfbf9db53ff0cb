"""Raise activation sparsity by training: ReLUfication, sparsity regularisers, distillation.

Example:
    >>> from moefy.finetune import FinetuneConfig, finetune, relufy_
    >>> relufy_(model)
    >>> report = finetune(model, blocks, FinetuneConfig(minutes=15, reg="prosparse"),
    ...                   out="runs/relu")
"""

from moefy.finetune.config import FinetuneConfig
from moefy.finetune.regularizers import (
    REGULARIZERS,
    hoyer_penalty,
    l1_penalty,
    penalty,
    prosparse_weight,
)
from moefy.finetune.relu import FATReLU, reapply_fatrelu, relufy_
from moefy.finetune.train import FinetuneReport, finetune

__all__ = [
    "FATReLU",
    "FinetuneConfig",
    "FinetuneReport",
    "REGULARIZERS",
    "finetune",
    "hoyer_penalty",
    "l1_penalty",
    "penalty",
    "prosparse_weight",
    "reapply_fatrelu",
    "relufy_",
]
