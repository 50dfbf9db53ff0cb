"""Sparse FFN kernels: C++ (AVX2 + FMA) for the CPU, each with a plain-torch reference twin.

- :func:`expert_ffn`: the selected experts of an expert-major MoE FFN (batch 1 and small
  batches, reading each selected expert's weights once for all tokens that chose it);
- :func:`routed_expert_ffn`: a linear / MLP router's top-k choice and :func:`expert_ffn` in one
  call (one C++ call per layer when decoding);
- :func:`threshold_linear`: a linear layer that skips the weight rows of dropped inputs (TEAL);
- :func:`threshold_gate_up`: the gate and up projections of one input under one threshold.

Each kernel is one ``torch.ops.moefy`` operator (:mod:`moefy.kernels.library`) with a C++
implementation for CPU tensors and a Triton one (``moefy[triton]``) for CUDA tensors; triton is
imported only when they run. :func:`kernel_fits` says whether a call can take a kernel.

The backend (auto / reference / cpu / triton) comes from ``MOEFY_KERNELS`` or
:func:`set_backend`; the C++ library is built on first use and cached (see
:mod:`moefy.kernels.build`).
"""

from moefy.kernels.activations import ACTIVATIONS, activation_name
from moefy.kernels.backend import (
    Backend,
    KernelFallbackWarning,
    get_backend,
    parse_backend,
    set_backend,
    use_backend,
)
from moefy.kernels.build import KernelBuildError
from moefy.kernels.fits import kernel_fits
from moefy.kernels.layout import is_all_zero, transposed_weight
from moefy.kernels.ops import (
    SMALL_BATCH_MAX,
    expert_ffn,
    routed_expert_ffn,
    threshold_gate_up,
    threshold_linear,
)

__all__ = [
    "ACTIVATIONS",
    "SMALL_BATCH_MAX",
    "Backend",
    "KernelBuildError",
    "KernelFallbackWarning",
    "activation_name",
    "expert_ffn",
    "get_backend",
    "is_all_zero",
    "kernel_fits",
    "parse_backend",
    "routed_expert_ffn",
    "set_backend",
    "threshold_gate_up",
    "threshold_linear",
    "transposed_weight",
    "use_backend",
]
