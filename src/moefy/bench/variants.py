"""The end-to-end variants of one model: dense, moefied with routers, carved, TEAL-sparsified.

Routers here are MoEfication's centroid routers, built from the weights in seconds with no
training: decode speed depends on how many experts run, not on how well they were chosen, so
an untrained router measures the same speed as a trained one (``moefy sweep`` and
``benchmarks/router_quality.py`` measure its quality). The TEAL thresholds are calibrated on a
little real text, so the measured sparsity during decode is close to the target.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from moefy.moe import MoEfyConfig, moe_layers, moefy_
from moefy.routing import attach_routers
from moefy.sparsify import TEALConfig, sparsify_

SPLIT = MoEfyConfig(num_experts=64, method="random")  # speed does not depend on the split
ROUTER = "centroid"
TEAL_CALIBRATION_TOKENS = 2048
TEAL_BLOCK_LEN = 128
# The carved variant: carved and budgeted on a little real text (speed depends on how many
# experts run and on the router's cost, both set by the budget, not on the quality of the carve).
CARVE_CALIBRATION_TOKENS = 1024


def routed_copy(model: nn.Module, fraction: float) -> nn.Module:
    """A moefied copy of ``model`` (64 experts per FFN) with centroid routers at ``fraction``."""
    moe = copy.deepcopy(model)
    moefy_(moe, SPLIT)
    attach_routers(moe, ROUTER, fraction=fraction)
    return moe.eval()


def set_fraction(model: nn.Module, fraction: float) -> Callable[[], None]:
    """A call that sets every router of ``model`` to run ``fraction`` of its experts."""
    layers = moe_layers(model)

    def apply() -> None:
        for moe in layers:
            moe.selector.set_topk(fraction=fraction)

    return apply


def teal_copy(model: nn.Module, tokenizer, sparsity: float, data: str) -> nn.Module:
    """A TEAL-sparsified copy (FFN and attention inputs, uniform share per layer).

    Args:
        model: the dense model.
        tokenizer: its tokenizer (to calibrate on ``data``).
        sparsity: share of inputs zeroed per linear layer.
        data: built-in text name for the calibration (see :func:`moefy.data.text.load_text`).
    """
    from moefy.data.text import load_text

    sparse = copy.deepcopy(model)
    blocks = load_text(data).blocks(
        tokenizer, split="calibration", block_len=TEAL_BLOCK_LEN, n_tokens=TEAL_CALIBRATION_TOKENS
    )
    config = TEALConfig(
        sparsity=sparsity,
        attention=True,
        greedy=False,
        min_calibration_tokens=TEAL_CALIBRATION_TOKENS,
        calibration_passes=1,
    )
    sparsify_(sparse, config, blocks)
    return sparse.eval()


def sparsified_copy(
    model: nn.Module, tokenizer, spec: str, sparsity: float, data: str
) -> nn.Module:
    """A copy sparsified by any registered training-free method, calibrated as
    :func:`teal_copy` is (the same text and tokens, one calibration pass).

    Args:
        model: the dense model.
        tokenizer: its tokenizer.
        spec: a method spec, ``rotate`` or ``scap:attention=true``
            (:func:`moefy.sparsify.config.split_method_spec`).
        sparsity: the method's target.
        data: built-in text name for the calibration.
    """
    from moefy.data.text import load_text
    from moefy.sparsify.config import config_from_spec

    sparse = copy.deepcopy(model)
    config = config_from_spec(spec, sparsity=sparsity)
    blocks = None
    if config.needs_calibration:
        blocks = load_text(data).blocks(
            tokenizer,
            split="calibration",
            block_len=TEAL_BLOCK_LEN,
            n_tokens=TEAL_CALIBRATION_TOKENS,
        )
        config = config.replace(min_calibration_tokens=TEAL_CALIBRATION_TOKENS)
    sparsify_(sparse, config, blocks)
    return sparse.eval()


def carved_copy(model: nn.Module, tokenizer, keep: float, data: str) -> nn.Module:
    """A carved copy (:func:`moefy.carve.carve_`: 8-neuron experts, 12.5 % shared, lstsq
    router) whose experts per layer are allocated to ``keep`` of the dense FFN FLOPs, routers
    included (:func:`moefy.moe.budget.allocate_experts`).

    Args:
        model: the dense model.
        tokenizer: its tokenizer (to carve on ``data``).
        keep: share of the dense FFN FLOPs per token, in (0, 1].
        data: built-in text name for the calibration.
    """
    from moefy.carve import carve_
    from moefy.data.text import load_text
    from moefy.moe.budget import allocate_experts

    carved = copy.deepcopy(model)
    blocks = load_text(data).blocks(
        tokenizer, split="calibration", block_len=TEAL_BLOCK_LEN, n_tokens=CARVE_CALIBRATION_TOKENS
    )
    carve_(carved, blocks)
    allocate_experts(carved, blocks, keep)
    return carved.eval()
