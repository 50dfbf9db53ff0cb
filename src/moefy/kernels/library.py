"""The ``torch.ops.moefy`` operators: each kernel declared once, its devices' implementations
registered for the dispatcher to pick.

Shape legend:
    N: tokens, D: model width, E: experts, S: slots per expert, S_in: input rows per expert,
    I: input features, O: output features, F: FFN width

As in torchao's ``ops.py``, every kernel is one dispatcher operator. Its schema is read from the
typed signature of its plain-torch twin in :mod:`moefy.kernels.reference` (which stays the
definition of the right answer). The C++ kernels (``csrc/sparse_ffn.cpp``) register themselves
as its CPU implementation when the extension loads, the Triton kernels
(:mod:`moefy.kernels.triton_kernels`) are its CUDA one, and its fake implementation, which
``torch.compile`` traces, is the reference twin run on fake tensors, so shapes and dtypes are the
reference's by construction. A Python default serves CPU tensors where the C++ kernels are not
registered: under Triton's interpreter (``TRITON_INTERPRET=1``, tests on machines without a GPU)
it runs the Triton kernels while triton is the backend in force, the C++ bindings otherwise.

Measured on this 2-core CPU (batch 1, 64 x 64 threshold linear): the C++ binding costs 4-8 us
a call, the operator with its C++ kernel 1-4 us more, an operator with a Python kernel about
10 us more and a ``torch.library.custom_op`` about 75 us more (its Python autograd and in-place
layers run on every call). So the operators are declared with ``Library.define`` rather than
``custom_op``, compiled graphs hold them (:func:`call_operator`), and eager calls from
:mod:`moefy.kernels.ops` call the implementations directly (:func:`implementation`).

Example:
    >>> torch.ops.moefy.threshold_linear(x, weight_t, None, torch.tensor(0.1))  # (N, O)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moefy.errors import MoefyError
from moefy.kernels import cpu, reference
from moefy.kernels.backend import Backend, interpreting_triton
from moefy.registry import Registry

NAMESPACE = "moefy"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


@dataclass(frozen=True)
class Kernel:
    """One declared kernel.

    Attributes:
        name: the operator's name, ``torch.ops.moefy.<name>``, and the implementations' name in
            each backend's module.
        signature: the typed function whose parameters are the operator's schema (the reference
            twin, or its operator form when an argument has no schema type).
        mutates: the arguments the kernel writes (tallies).
        unpack: operator arguments -> the implementations' arguments; None when they are the
            same.
        weights_fit: ``(backend, weights) -> bool``, a rule of this kernel beyond the common
            ones of :func:`moefy.kernels.fits.kernel_fits`; None when there is none.
    """

    name: str
    signature: Callable[..., object]
    mutates: tuple[str, ...] = ()
    unpack: Callable[..., tuple] | None = None
    weights_fit: Callable[[Backend, tuple[torch.Tensor, ...]], bool] | None = None


KERNELS: Registry[Kernel] = Registry("kernel")


def implementation(backend: Backend, name: str) -> Callable[..., object]:
    """The function that runs kernel ``name`` on ``backend`` (reference, cpu or triton).

    Looked up on every call, so a test can replace it to see that it ran.
    """
    if backend is Backend.TRITON:
        from moefy.kernels import triton_kernels  # imports triton: only when it runs

        return getattr(triton_kernels, name)
    return getattr(reference if backend is Backend.REFERENCE else cpu, name)


def call_operator(name: str, backend: Backend, *args: object) -> object:
    """``torch.ops.moefy.<name>(*args)``, the call a compiled graph holds.

    Args:
        name: a kernel of :data:`KERNELS`.
        backend: the backend chosen for this call (cpu or triton).
        *args: the operator's arguments.

    Raises:
        MoefyError: CPU tensors whose chosen backend is not the one the CPU implementation runs
            (triton is interpreted on CPU tensors only as the backend in force).
    """
    x = args[0]
    if x.device.type == "cpu" and (backend is Backend.TRITON) != interpreting_triton():
        raise MoefyError(
            "a compiled call on CPU tensors runs the kernel of the backend in force; choose "
            "it with moefy.kernels.use_backend, not backend="
        )
    return getattr(torch.ops.moefy, name)(*args)


def _run_on(backend: Backend | None, kernel: Kernel) -> Callable[..., object]:
    """The operator's implementation on one device (None: the default for CPU tensors, the C++
    bindings or the interpreted Triton kernels)."""

    def run(*args: object) -> object:
        chosen = backend
        if chosen is None:
            chosen = Backend.TRITON if interpreting_triton() else Backend.CPU
        if kernel.unpack is not None:
            args = kernel.unpack(*args)
        return implementation(chosen, kernel.name)(*args)

    return run


def _fake(kernel: Kernel) -> Callable[..., object]:
    """The reference twin on fake tensors, writing to copies of the arguments it mutates."""
    parameters = inspect.signature(kernel.signature)

    def fake(*args: object, **kwargs: object) -> object:
        bound = parameters.bind(*args, **kwargs)
        for name in kernel.mutates:
            written = bound.arguments.get(name)
            if written is not None:
                bound.arguments[name] = written.clone()
        return kernel.signature(*bound.args, **bound.kwargs)

    return fake


def declare(kernel: Kernel, *, help: str) -> Kernel:  # noqa: A002 - the registry's word
    """Define ``torch.ops.moefy.<kernel.name>``, register its default, CUDA and fake
    implementations (the C++ extension registers the CPU one), and add it to :data:`KERNELS`.

    Returns:
        ``kernel``.
    """
    schema = torch.library.infer_schema(kernel.signature, mutates_args=kernel.mutates)
    _LIBRARY.define(kernel.name + schema)
    qualified = f"{NAMESPACE}::{kernel.name}"
    _LIBRARY.impl(kernel.name, _run_on(None, kernel), "CompositeExplicitAutograd")
    torch.library.register_kernel(qualified, "cuda", _run_on(Backend.TRITON, kernel), lib=_LIBRARY)
    torch.library.register_fake(qualified, _fake(kernel), lib=_LIBRARY)
    return KERNELS.register(kernel.name, kernel, help=help)


def router_lists(
    layers: reference.RouterLayers,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """A router's (weight, bias) pairs as the operator takes them: weights, then biases."""
    return [weight for weight, _ in layers], [bias for _, bias in layers]


def _router_pairs(
    x: torch.Tensor,
    router_weights: list[torch.Tensor],
    router_biases: list[torch.Tensor | None],
    *rest: object,
) -> tuple:
    """The routed operator's arguments as the implementations take them (the router as pairs)."""
    return (x, list(zip(router_weights, router_biases, strict=True)), *rest)


def _with_router_lists(routed: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``routed`` (its router as (weight, bias) pairs, see :data:`reference.RouterLayers`) as
    the operator takes it: the router as two lists, weights then biases (a schema has no
    pairs). Its signature is ``routed``'s with ``layers`` replaced by the two lists."""

    def operator_form(*args: object) -> torch.Tensor:
        return routed(*_router_pairs(*args))

    signature = inspect.signature(routed, eval_str=True)
    x, _layers, *rest = signature.parameters.values()
    lists = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
        for name, annotation in (
            ("router_weights", list[torch.Tensor]),
            ("router_biases", list[torch.Tensor | None]),
        )
    ]
    operator_form.__signature__ = signature.replace(parameters=[x, *lists, *rest])
    return operator_form


def _same_shapes_for_triton(backend: Backend, weights: tuple[torch.Tensor, ...]) -> bool:
    """Triton reads gate and up in one pass, so they must be the same shape."""
    return backend is not Backend.TRITON or weights[0].shape == weights[1].shape


declare(
    Kernel("expert_ffn", reference.expert_ffn),
    help="(N, D) output of each token's selected experts, reading only their weights",
)
declare(
    Kernel(
        "routed_expert_ffn",
        _with_router_lists(reference.routed_expert_ffn),
        mutates=("counts", "tokens_seen"),
        unpack=_router_pairs,
    ),
    help="a linear / MLP router's top-k experts per token, then their FFN output",
)
declare(
    Kernel("threshold_linear", reference.threshold_linear, mutates=("zeros_out",)),
    help="(N, O) linear layer skipping the weight rows of inputs under their threshold",
)
declare(
    Kernel(
        "threshold_gate_up",
        reference.threshold_gate_up,
        mutates=("zeros_out",),
        weights_fit=_same_shapes_for_triton,
    ),
    help="(N, F) gate and up projections of one input under one threshold",
)
