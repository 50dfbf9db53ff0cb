"""The kernels' public entry points: one call, dispatched to the backend in force.

Shape legend:
    N: tokens, D: model width, E: experts, S: slots per expert, S_in: input rows per expert,
    I: input features, O: output features

Model code asks the ``*_activation`` / ``*_ready`` helpers whether a call should take the C++
kernel (small batch, float32 CPU tensors, no gradient needed, a known activation) and keeps its
own torch path otherwise; tests and benchmarks call :func:`expert_ffn`,
:func:`routed_expert_ffn`,
:func:`threshold_linear` and :func:`threshold_gate_up` directly with an explicit ``backend``.

The Triton kernels take 1..SMALL_BATCH_MAX tokens of float16 / bfloat16 / float32 with
contiguous weights of the tokens' dtype and no gradient wanted; other calls under the triton
backend run the reference twin (torch on the same device), as unfit calls do under cpu.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.kernels import cpu, reference
from moefy.kernels.activations import activation_name
from moefy.kernels.backend import Backend, cpu_extension, resolve, use_backend
from moefy.kernels.layout import is_all_zero

# Up to this many tokens the kernels read each weight once for all of them and beat torch;
# beyond it a batch is compute-bound and torch's GEMMs win (../shared/PERF.md).
SMALL_BATCH_MAX = 16
_IMPLEMENTATIONS = {Backend.REFERENCE: reference, Backend.CPU: cpu}
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _implementation(backend: Backend) -> ModuleType:
    if backend is Backend.TRITON:
        from moefy.kernels import triton_kernels  # imports triton: only when it runs

        return triton_kernels
    return _IMPLEMENTATIONS[backend]


def _triton_fits(x: torch.Tensor, *weights: torch.Tensor, extras=()) -> bool:
    """Tokens and weights the Triton kernels take (see the module docstring)."""
    if not 0 < x.shape[0] <= SMALL_BATCH_MAX or x.dtype not in _TRITON_DTYPES:
        return False
    if any(w.dtype != x.dtype or not w.is_contiguous() for w in weights):
        return False
    present = [t for t in (x, *weights, *extras) if t is not None]
    if any(t.device != x.device for t in present):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def _concrete(backend: str | Backend | None, device: torch.device) -> Backend:
    if backend is None:
        return resolve(device)
    if backend is Backend.CPU and device.type == "cpu" and cpu_extension() is not None:
        return backend  # already checked by the caller's *_ready / *_activation
    with use_backend(backend):
        return resolve(device)


def _cpu_tensors(*tensors: torch.Tensor | None) -> bool:
    """All given tensors float32 on the CPU, and no gradient is wanted through them."""
    # Asked on every decode step of every layer: plain attribute checks, no allocations.
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.dtype is not torch.float32 or not t.is_cpu or (grad and t.requires_grad):
            return False
    return True


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
    if chosen is Backend.TRITON and not _triton_fits(x, w_in, w_out, extras=(b_in, b_out, mask)):
        chosen = Backend.REFERENCE
    return _implementation(chosen).expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated)


def routed_expert_ffn(
    x: torch.Tensor,
    layers: reference.RouterLayers,
    k: int,
    counts: torch.Tensor,
    tokens_seen: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    act: str,
    gated: bool,
    *,
    backend: str | Backend | None = None,
) -> torch.Tensor:
    """A linear or MLP router's top-``k`` experts per token, then their FFN output.

    The C++ backend does it all in one call (decode pays one Python call per layer); other
    backends route in torch (:func:`reference.route`) and run :func:`expert_ffn`.

    Args:
        x: (N, D) tokens.
        layers: the router as (weight (O, I), bias (O,) or None) pairs with ReLU between them;
            the last one outputs (N, E) logits whose order picks the experts.
        k: experts per token, 1..E.
        counts: (E,) int64, gains each expert's selections (the layer's tally).
        tokens_seen: int64 scalar, gains N.
        w_in, w_out, b_in, b_out, act, gated: as :func:`expert_ffn`.
        backend: auto / reference / cpu / triton; default the one in force.

    Returns:
        (N, D) like ``x``.

    Raises:
        MoefyError: k outside 1..E.

    Example:
        >>> y = routed_expert_ffn(x, [(centroids, None)], 16, counts, seen, moe.w_in,
        ...                       moe.w_out, None, None, "silu", True, backend="cpu")
    """
    if isinstance(k, bool) or not 1 <= int(k) <= w_in.shape[0]:
        raise MoefyError(f"k={k!r} experts is out of range: the layer has 1..{w_in.shape[0]}")
    chosen = _concrete(backend, x.device)
    router = [t for pair in layers for t in pair if t is not None]
    if (
        chosen is Backend.CPU
        and _cpu_tensors(x, w_in, w_out, b_in, b_out, *router)
        and w_in.is_contiguous()
        and w_out.is_contiguous()
    ):
        return cpu.routed_expert_ffn(
            x, layers, k, counts, tokens_seen, w_in, w_out, b_in, b_out, act, gated
        )
    mask = reference.route(x, layers, k, counts, tokens_seen)
    return expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated, backend=chosen)


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
    if chosen is Backend.TRITON and not _triton_fits(x, weight_t, extras=(bias,)):
        chosen = Backend.REFERENCE
    return _implementation(chosen).threshold_linear(x, weight_t, bias, threshold, zeros_out)


def threshold_gate_up(
    x: torch.Tensor,
    gate_t: torch.Tensor,
    up_t: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    threshold: torch.Tensor,
    zeros_out: torch.Tensor | None = None,
    *,
    backend: str | Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up projections of one input, skipping the rows of its dropped entries.

    Triton reads x once for both (one launch, two outputs); cpu runs two C++ calls.

    Args:
        x: (N, I) inputs.
        gate_t, up_t: (I, F) the gate and up weights transposed.
        gate_bias, up_bias: (F,) or None.
        threshold: () or (I,), shared by both.
        zeros_out: int64 scalar that gains the count of zero inputs after dropping, or None.
        backend: auto / reference / cpu / triton; default the one in force.

    Returns:
        (gate, up), each (N, F).

    Example:
        >>> gate, up = threshold_gate_up(x, g_t, u_t, None, None, torch.tensor(0.2))
    """
    chosen = _concrete(backend, x.device)
    weights = (gate_t, up_t)
    cpu_fits = _cpu_tensors(x, *weights, gate_bias, up_bias) and all(
        w.is_contiguous() for w in weights
    )
    if chosen is Backend.CPU and not cpu_fits:
        chosen = Backend.REFERENCE
    fits = gate_t.shape == up_t.shape and _triton_fits(x, *weights, extras=(gate_bias, up_bias))
    if chosen is Backend.TRITON and not fits:
        chosen = Backend.REFERENCE
    return _implementation(chosen).threshold_gate_up(
        x, gate_t, up_t, gate_bias, up_bias, threshold, zeros_out
    )


def expert_ffn_activation(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, act: nn.Module
) -> str | None:
    """The activation name to pass to :func:`expert_ffn` when this call should take a kernel
    (C++ for CPU tensors, Triton for CUDA ones) under the backend in force; None when the
    caller's torch path should run.

    Args:
        x: (N, D) tokens; N must be 1..SMALL_BATCH_MAX.
        w_in, w_out: the expert weights (contiguous; float32 on the CPU, fp32/fp16/bf16 like
            ``x`` for Triton).
        act: the FFN's activation module (SiLU, GELU, ReLU; others run in torch).
    """
    if not 0 < x.shape[0] <= SMALL_BATCH_MAX:
        return None
    if not _kernel_fits(resolve(x.device), x, w_in, w_out):
        return None
    return activation_name(act)


def _kernel_fits(
    chosen: Backend, x: torch.Tensor, *weights: torch.Tensor, contiguous: bool = True
) -> bool:
    """Whether the kernel of ``chosen`` (cpu or triton; not reference) takes these tensors
    (``contiguous=False``: the C++ kernel reads a contiguous copy, any layout will do)."""
    if chosen is Backend.CPU:
        return _cpu_tensors(x, *weights) and (
            not contiguous or all(w.is_contiguous() for w in weights)
        )
    return chosen is Backend.TRITON and _triton_fits(x, *weights)


def threshold_linear_ready(x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor) -> bool:
    """Whether a threshold linear on ``x`` (N, I) should take a kernel now (C++ for CPU
    tensors, Triton for CUDA ones, under the backend in force).

    A threshold of zero everywhere keeps the caller's dense path, which is then exact.
    """
    # the weight's dtype and device decide (the kernels read its cached transposed copy)
    return threshold_linear_fits(x, weight, contiguous=False) and not is_all_zero(threshold)


def threshold_linear_fits(
    x: torch.Tensor, weight: torch.Tensor, *, contiguous: bool = True
) -> bool:
    """Whether a kernel (under the backend in force) takes ``x`` (N, I) with this weight (a
    contiguous (I, O) one; ``contiguous=False``: any layout, the kernel reads a transposed copy),
    whatever the threshold."""
    if not 0 < x.shape[0] <= SMALL_BATCH_MAX:
        return False
    return _kernel_fits(resolve(x.device), x, weight, contiguous=contiguous)
