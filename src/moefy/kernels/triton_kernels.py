"""The Triton kernels behind the same signatures as :mod:`moefy.kernels.reference`.

Importing this module imports triton; :mod:`moefy.kernels.ops` does so only when the triton
backend runs, so moefy and its CPU paths work without triton installed.

Eager calls launch the kernels directly. Under ``torch.compile`` they run as the custom
operators ``torch.ops.moefy.triton_*`` defined here: opaque to the tracer (which would otherwise
trace into the launcher), shaped by their fake functions, and free of host syncs, so a compiled
decode step captured as a CUDA graph replays them.
"""

from __future__ import annotations

import torch

from moefy.kernels import triton_experts, triton_threshold


@torch.library.custom_op("moefy::triton_expert_ffn", mutates_args=())
def _expert_ffn_op(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    act: str,
    gated: bool,
) -> torch.Tensor:
    return triton_experts.expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated)


@_expert_ffn_op.register_fake
def _(x, mask, w_in, w_out, b_in, b_out, act, gated):
    return x.new_empty(x.shape)


@torch.library.custom_op("moefy::triton_threshold_linear", mutates_args=("zeros_out",))
def _threshold_linear_op(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor,
    zeros_out: torch.Tensor | None,
) -> torch.Tensor:
    return triton_threshold.threshold_linear(x, weight_t, bias, threshold, zeros_out)


@_threshold_linear_op.register_fake
def _(x, weight_t, bias, threshold, zeros_out):
    return x.new_empty((x.shape[0], weight_t.shape[1]))


@torch.library.custom_op("moefy::triton_threshold_gate_up", mutates_args=("zeros_out",))
def _threshold_gate_up_op(
    x: torch.Tensor,
    gate_t: torch.Tensor,
    up_t: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    threshold: torch.Tensor,
    zeros_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_threshold.threshold_gate_up(
        x, gate_t, up_t, gate_bias, up_bias, threshold, zeros_out
    )


@_threshold_gate_up_op.register_fake
def _(x, gate_t, up_t, gate_bias, up_bias, threshold, zeros_out):
    return x.new_empty((x.shape[0], gate_t.shape[1])), x.new_empty((x.shape[0], up_t.shape[1]))


def expert_ffn(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    act: str,
    gated: bool,
) -> torch.Tensor:
    """(N, D) output over each token's selected experts; see :func:`reference.expert_ffn`."""
    if torch.compiler.is_compiling():
        return _expert_ffn_op(x, mask, w_in, w_out, b_in, b_out, act, gated)
    return triton_experts.expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated)


def threshold_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor,
    zeros_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, O) linear output skipping dropped inputs; see :func:`reference.threshold_linear`."""
    if torch.compiler.is_compiling():
        return _threshold_linear_op(x, weight_t, bias, threshold, zeros_out)
    return triton_threshold.threshold_linear(x, weight_t, bias, threshold, zeros_out)


def threshold_gate_up(
    x: torch.Tensor,
    gate_t: torch.Tensor,
    up_t: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    threshold: torch.Tensor,
    zeros_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up outputs in one launch; see :func:`reference.threshold_gate_up`."""
    if torch.compiler.is_compiling():
        return _threshold_gate_up_op(x, gate_t, up_t, gate_bias, up_bias, threshold, zeros_out)
    return triton_threshold.threshold_gate_up(
        x, gate_t, up_t, gate_bias, up_bias, threshold, zeros_out
    )


__all__ = ["expert_ffn", "threshold_gate_up", "threshold_linear"]
