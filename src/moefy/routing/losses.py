"""The losses a router is fitted with, by name (``RouterConfig.loss``).

Shape legend:
    N: tokens, E: experts
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as Fn


def _mse_log_norm_loss(predicted: torch.Tensor, log_norms: torch.Tensor) -> torch.Tensor:
    """Regression of every expert's log norm (the D2DMoE / DSTI recipe)."""
    return Fn.mse_loss(predicted, log_norms)


def _listwise_loss(predicted: torch.Tensor, log_norms: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the predicted share distribution against each token's true shares.

    Only the order and the shares of the norms decide top-k and dynamic-k selection, so this
    ranking loss weighs each expert by its share of the token's total norm and ignores the
    token's overall scale (ListNet with norms as relevance).
    """
    shares = log_norms.softmax(dim=-1)  # (N, E): norm / total norm per token
    return -(shares * predicted.log_softmax(dim=-1)).sum(dim=-1).mean()


# loss name -> ((N, E) predicted log norms, (N, E) true log norms) -> scalar loss
ROUTER_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": _mse_log_norm_loss,
    "listwise": _listwise_loss,
}
