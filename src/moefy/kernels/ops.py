"""The kernels' public entry points: one call, run by the kernel that fits or by torch.

Shape legend:
    N: tokens, D: model width, E: experts, S: slots per expert, S_in: input rows per expert,
    I: input features, O: output features, F: FFN width

Each call asks :func:`moefy.kernels.fits.kernel_fits` which kernel takes it (C++ for CPU
tensors, Triton for CUDA ones, under the backend in force or the ``backend`` given) and runs the
reference twin (torch on the same device) when none does. Eager calls run the implementation
directly; under ``torch.compile`` the graph holds the ``torch.ops.moefy`` operator instead
(:mod:`moefy.kernels.library`). Model code asks :func:`kernel_fits` itself and keeps its own
torch path when no kernel fits; tests and benchmarks call :func:`expert_ffn`,
:func:`routed_expert_ffn`, :func:`threshold_linear` and :func:`threshold_gate_up` directly,
often with an explicit ``backend``.
"""

from __future__ import annotations

import torch

from moefy.errors import MoefyError
from moefy.kernels import reference
from moefy.kernels.backend import Backend
from moefy.kernels.fits import SMALL_BATCH_MAX, kernel_fits
from moefy.kernels.library import call_operator, implementation, router_lists

__all__ = [
    "SMALL_BATCH_MAX",
    "expert_ffn",
    "kernel_fits",
    "routed_expert_ffn",
    "threshold_gate_up",
    "threshold_linear",
]


def _run(
    name: str, chosen: Backend | None, args: tuple, operator_args: tuple | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Kernel ``name`` on ``chosen`` (None: the reference twin); compiled: its operator."""
    if chosen is None:
        return implementation(Backend.REFERENCE, name)(*args)
    if torch.compiler.is_compiling():
        return call_operator(name, chosen, *(args if operator_args is None else operator_args))
    return implementation(chosen, name)(*args)


def _tally_for_graph(
    zeros_out: torch.Tensor | None, x: torch.Tensor, chosen: Backend | None
) -> torch.Tensor | None:
    """``zeros_out``, or a scratch tally in its place when it is None and a compiled graph holds
    the operator (``chosen`` a kernel; the reference twin takes None as it is).

    Inductor cannot lower an operator whose mutated argument is None (an AssertionError,
    "getitem is not an OpOverload"), which a step traced inside
    :func:`moefy.sparsify.wrappers.counters_paused` passes; a tally made in the graph and never
    read costs one int64 and keeps no state.
    """
    if zeros_out is None and chosen is not None and torch.compiler.is_compiling():
        return torch.zeros((), dtype=torch.int64, device=x.device)
    return zeros_out


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
    chosen = kernel_fits("expert_ffn", x, w_in, w_out, extras=(b_in, b_out, mask), backend=backend)
    return _run("expert_ffn", chosen, (x, mask, w_in, w_out, b_in, b_out, act, gated))


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
    router = [t for pair in layers for t in pair]
    extras = (b_in, b_out, *router)
    chosen = kernel_fits("routed_expert_ffn", x, w_in, w_out, extras=extras, backend=backend)
    if chosen is Backend.CPU:  # the fused C++ kernel; Triton runs the experts alone
        args = (x, layers, k, counts, tokens_seen, w_in, w_out, b_in, b_out, act, gated)
        return _run("routed_expert_ffn", chosen, args, (x, *router_lists(layers), *args[2:]))
    mask = reference.route(x, layers, k, counts, tokens_seen)  # (N, E)
    return expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated, backend=backend)


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
    chosen = kernel_fits("threshold_linear", x, weight_t, extras=(bias,), backend=backend)
    zeros_out = _tally_for_graph(zeros_out, x, chosen)
    return _run("threshold_linear", chosen, (x, weight_t, bias, threshold, zeros_out))


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
    chosen = kernel_fits(
        "threshold_gate_up", x, gate_t, up_t, extras=(gate_bias, up_bias), backend=backend
    )
    zeros_out = _tally_for_graph(zeros_out, x, chosen)
    args = (x, gate_t, up_t, gate_bias, up_bias, threshold, zeros_out)
    return _run("threshold_gate_up", chosen, args)
