"""The C++ (AVX2 + FMA) kernels behind the same signatures as :mod:`moefy.kernels.reference`.

Shape legend:
    N: tokens, D: model width, E: experts, S: slots per expert, S_in: input rows per expert,
    I: input features, O: output features

Inputs must be float32 CPU tensors; the weights must be contiguous (they are read in place,
never copied). Tokens, masks and thresholds are made contiguous here (they are small).

Eager calls go straight to the extension's Python bindings (the cheapest call); under
``torch.compile`` the same kernels run as the dispatcher operators the extension registers
(``torch.ops.<library name>.*``, shapes given by the fake functions below), so a compiled decode
step holds them in its graph.
"""

from __future__ import annotations

from types import ModuleType

import torch

from moefy.kernels.activations import ACTIVATIONS
from moefy.kernels.backend import cpu_extension
from moefy.kernels.build import KernelBuildError
from moefy.kernels.reference import RouterLayers

_NO_BIAS = torch.empty(0)  # a router layer without bias, for the C++ side
_OPERATORS: dict[str, object] = {}  # library name -> torch.ops namespace of its operators


def _extension():
    extension = cpu_extension()
    if extension is None:
        raise KernelBuildError("the cpu kernels are not built; see moefy.kernels.backend")
    if torch.compiler.is_compiling():
        return _OPERATORS[extension.__name__]
    return extension


def register_operators(extension: ModuleType) -> None:
    """Give the extension's dispatcher operators fake (shape-only) functions, so that
    ``torch.compile`` can trace them; called once, when the extension loads."""
    namespace = extension.__name__
    if namespace in _OPERATORS:
        return

    def same_as_x(x, *args):
        return x.new_empty(x.shape)

    def linear_out(x, weight_t, *args):
        return x.new_empty((x.shape[0], weight_t.shape[1]))

    torch.library.register_fake(f"{namespace}::expert_ffn")(same_as_x)
    torch.library.register_fake(f"{namespace}::routed_expert_ffn")(same_as_x)
    torch.library.register_fake(f"{namespace}::threshold_linear")(linear_out)
    _OPERATORS[namespace] = getattr(torch.ops, namespace)


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
    return _extension().expert_ffn(
        x.contiguous(),
        mask.to(torch.bool).contiguous(),
        w_in,
        w_out,
        b_in,
        b_out,
        ACTIVATIONS[act],
        bool(gated),
    )


def routed_expert_ffn(
    x: torch.Tensor,
    layers: RouterLayers,
    k: int,
    counts: torch.Tensor,
    tokens_seen: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    act: str,
    gated: bool,
) -> torch.Tensor:
    """Router, top-k and experts in one C++ call; see :func:`reference.routed_expert_ffn`."""
    router = []
    for weight, bias in layers:
        router += [weight, _NO_BIAS if bias is None else bias]
    return _extension().routed_expert_ffn(
        x.contiguous(),
        router,
        int(k),
        counts,
        tokens_seen,
        w_in,
        w_out,
        b_in,
        b_out,
        ACTIVATIONS[act],
        bool(gated),
    )


def threshold_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor,
    zeros_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, O) linear output skipping dropped inputs; see :func:`reference.threshold_linear`."""
    threshold = threshold.to(device=x.device, dtype=torch.float32).reshape(-1).contiguous()
    return _extension().threshold_linear(x.contiguous(), weight_t, bias, threshold, zeros_out)


def threshold_gate_up(
    x: torch.Tensor,
    gate_t: torch.Tensor,
    up_t: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    threshold: torch.Tensor,
    zeros_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up outputs as two C++ calls; see :func:`reference.threshold_gate_up`."""
    gate = threshold_linear(x, gate_t, gate_bias, threshold, zeros_out)
    return gate, threshold_linear(x, up_t, up_bias, threshold)
