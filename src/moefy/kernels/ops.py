"""The kernels' public entry points: one call, dispatched to the backend in force.

Shape legend:
    N: tokens, D: model width, E: experts, S: slots per expert, S_in: input rows per expert,
    I: input features, O: output features

Model code asks the ``*_activation`` / ``*_ready`` helpers whether a call should take the C++
kernel (small batch, float32 CPU tensors, no gradient needed, a known activation) and keeps its
own torch path otherwise; tests and benchmarks call :func:`expert_ffn` and
:func:`threshold_linear` directly with an explicit ``backend``.
"""

from __future__ import annotations

import torch
from torch import nn

from moefy.kernels import cpu, reference
from moefy.kernels.activations import activation_name
from moefy.kernels.backend import Backend, cpu_extension, resolve, use_backend
from moefy.kernels.layout import is_all_zero

# Up to this many tokens the kernels read each weight once for all of them and beat torch;
# beyond it a batch is compute-bound and torch's GEMMs win (../shared/PERF.md).
SMALL_BATCH_MAX = 16
_IMPLEMENTATIONS = {Backend.REFERENCE: reference, Backend.CPU: cpu}


def _concrete(backend: str | Backend | None, device: torch.device) -> Backend:
    if backend is None:
        return resolve(device)
    if backend is Backend.CPU and device.type == "cpu" and cpu_extension() is not None:
        return backend  # already checked by the caller's *_ready / *_activation
    with use_backend(backend):
        return resolve(device)


def _cpu_tensors(*tensors: torch.Tensor | None) -> bool:
    """All given tensors float32 on the CPU, and no gradient is wanted through them."""
    present = [t for t in tensors if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in present):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def expert_ffn(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    act: str,
    gated: bool,
    *,
    backend: str | Backend | None = None,
) -> torch.Tensor:
    """The FFN output over each token's selected experts, reading only their weights.

    Args:
        x: (N, D) tokens.
        mask: (N, E) bool, experts per token.
        w_in: (E, S_in, D), gate rows then up rows per expert when gated.
        w_out: (E, S, D), the down projection transposed.
        b_in: (E, S_in) or None.
        b_out: (D,) or None.
        act: ``relu``, ``silu``, ``gelu_tanh`` or ``gelu_erf``.
        gated: ``act(gate) * up`` when True.
        backend: auto / reference / cpu / triton; default the one in force.

    Returns:
        (N, D) float tensor like ``x``.

    Example:
        >>> y = expert_ffn(x, mask, moe.w_in, moe.w_out, None, None, "silu", True, backend="cpu")
    """
    chosen = _concrete(backend, x.device)
    fits = _cpu_tensors(x, w_in, w_out, b_in, b_out) and w_in.is_contiguous()
    if chosen is Backend.CPU and not (fits and w_out.is_contiguous()):
        chosen = Backend.REFERENCE  # a layout or dtype the C++ kernel does not take
    return _IMPLEMENTATIONS[chosen].expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated)


def threshold_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor,
    zeros_out: torch.Tensor | None = None,
    *,
    backend: str | Backend | None = None,
) -> torch.Tensor:
    """A linear layer skipping the weight rows of inputs with ``|x_i| <= threshold_i``.

    Args:
        x: (N, I) inputs.
        weight_t: (I, O) the weight transposed (contiguous rows per input).
        bias: (O,) or None.
        threshold: () or (I,).
        zeros_out: int64 scalar that gains the count of zero inputs after dropping, or None.
        backend: auto / reference / cpu / triton; default the one in force.

    Returns:
        (N, O).

    Example:
        >>> y = threshold_linear(x, w.t().contiguous(), None, torch.tensor(0.2), backend="cpu")
    """
    chosen = _concrete(backend, x.device)
    if chosen is Backend.CPU and not (_cpu_tensors(x, weight_t, bias) and weight_t.is_contiguous()):
        chosen = Backend.REFERENCE
    return _IMPLEMENTATIONS[chosen].threshold_linear(x, weight_t, bias, threshold, zeros_out)


def expert_ffn_activation(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, act: nn.Module
) -> str | None:
    """The activation name to pass to :func:`expert_ffn` when this call should take the C++
    kernel under the backend in force; None when the caller's torch path should run.

    Args:
        x: (N, D) tokens; N must be 1..SMALL_BATCH_MAX.
        w_in, w_out: the expert weights (float32, contiguous, on the CPU).
        act: the FFN's activation module (SiLU, GELU, ReLU; others run in torch).
    """
    if not 0 < x.shape[0] <= SMALL_BATCH_MAX or not _cpu_tensors(x, w_in, w_out):
        return None
    if not (w_in.is_contiguous() and w_out.is_contiguous()):
        return None
    if resolve(x.device) is not Backend.CPU:
        return None
    return activation_name(act)


def threshold_linear_ready(x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor) -> bool:
    """Whether a threshold linear on ``x`` (N, I) should take the C++ kernel now.

    A threshold of zero everywhere keeps the caller's dense path, which is then exact.
    """
    if not 0 < x.shape[0] <= SMALL_BATCH_MAX or not _cpu_tensors(x, weight):
        return False
    return resolve(x.device) is Backend.CPU and not is_all_zero(threshold)
