"""The C++ (AVX2 + FMA) kernels behind the same signatures as :mod:`moefy.kernels.reference`.

Shape legend:
    N: tokens, D: model width, E: experts, S: slots per expert, S_in: input rows per expert,
    I: input features, O: output features

Each takes the arguments of its reference twin (typed there, the kernel's declaration) and
transforms only those the C++ side needs in another form. Inputs must be float32 CPU tensors;
the weights must be contiguous (they are read in place, never copied). Tokens, masks and
thresholds are made contiguous here (they are small).

These functions call the extension's Python bindings, the cheapest call; they are the CPU
implementations of the ``torch.ops.moefy`` operators (:mod:`moefy.kernels.library`), which a
compiled graph calls instead.
"""

from __future__ import annotations

from types import ModuleType

import torch

from moefy.kernels.activations import ACTIVATIONS
from moefy.kernels.backend import cpu_extension
from moefy.kernels.build import KernelBuildError
from moefy.kernels.reference import RouterLayers

_NO_BIAS = torch.empty(0)  # a router layer without bias, for the C++ side


def _extension() -> ModuleType:
    extension = cpu_extension()
    if extension is None:
        raise KernelBuildError("the cpu kernels are not built; see moefy.kernels.backend")
    return extension


def expert_ffn(x: torch.Tensor, mask: torch.Tensor, *experts: object) -> torch.Tensor:
    """(N, D) output over each token's selected experts; see :func:`reference.expert_ffn`.

    ``experts``: w_in, w_out, b_in, b_out, act, gated, as there.
    """
    *weights, act, gated = experts  # w_in, w_out, b_in, b_out: read in place
    mask = mask.to(torch.bool).contiguous()  # (N, E)
    return _extension().expert_ffn(x.contiguous(), mask, *weights, ACTIVATIONS[act], bool(gated))


def routed_expert_ffn(x: torch.Tensor, layers: RouterLayers, *args: object) -> torch.Tensor:
    """Router, top-k and experts in one C++ call; see :func:`reference.routed_expert_ffn`.

    ``args``: k, counts, tokens_seen, then the expert arguments of :func:`expert_ffn`.
    """
    k, counts, tokens_seen, *weights, act, gated = args
    router = []
    for weight, bias in layers:
        router += [weight, _NO_BIAS if bias is None else bias]
    return _extension().routed_expert_ffn(
        x.contiguous(), router, int(k), counts, tokens_seen, *weights, ACTIVATIONS[act], bool(gated)
    )


def threshold_linear(x, weight_t, bias, threshold, zeros_out=None):
    """(N, O) linear output skipping dropped inputs; arguments as
    :func:`reference.threshold_linear`."""
    # () or (I,): the C++ side reads its values in place (converted only when it must be)
    if threshold.dtype is not torch.float32 or not threshold.is_cpu:
        threshold = threshold.to(device=x.device, dtype=torch.float32)
    threshold = threshold.contiguous()
    return _extension().threshold_linear(x.contiguous(), weight_t, bias, threshold, zeros_out)


def threshold_gate_up(x, gate_t, up_t, gate_bias, up_bias, threshold, zeros_out=None):
    """Gate and up outputs as two C++ calls; arguments and result as
    :func:`reference.threshold_gate_up`."""
    gate = threshold_linear(x, gate_t, gate_bias, threshold, zeros_out)
    return gate, threshold_linear(x, up_t, up_bias, threshold)
