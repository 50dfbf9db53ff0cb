"""Whether a call can take a kernel: one answer for the public kernel calls and for model code.

Shape legend:
    N: tokens

A call takes the kernel of the backend that :func:`moefy.kernels.backend.resolve` picks for its
device when its tensors suit that kernel:

- 1..:data:`SMALL_BATCH_MAX` tokens, on one device, with no gradient wanted through any of them;
- C++ (cpu): float32 tokens, weights, biases and router layers;
- Triton: float32 / float16 / bfloat16 tokens, with weights of the tokens' dtype;
- weights contiguous, unless the caller passes ``contiguous=False`` because the kernel will read
  a contiguous copy it keeps (the threshold layers' cached transposed weight);
- and the kernel's own rule (:attr:`moefy.kernels.library.Kernel.weights_fit`).

Any other call runs the reference twin (plain torch on the same device), or the caller's own
torch path.
"""

from __future__ import annotations

import torch

from moefy.kernels.backend import Backend, resolve
from moefy.kernels.library import KERNELS

# Up to this many tokens the kernels read each weight once for all of them and beat torch
# (`moefy bench` times batches 1, 4 and 16 against dense in the same run); beyond it a batch is
# compute-bound and torch's GEMMs win. The Triton kernels' token tiles hold at most this many.
SMALL_BATCH_MAX = 16
_TOKEN_DTYPES = {
    Backend.CPU: (torch.float32,),
    Backend.TRITON: (torch.float32, torch.float16, torch.bfloat16),
}


def kernel_fits(
    name: str,
    x: torch.Tensor,
    *weights: torch.Tensor,
    extras: tuple[torch.Tensor | None, ...] = (),
    contiguous: bool = True,
    backend: str | Backend | None = None,
) -> Backend | None:
    """The backend whose kernel runs this call (cpu or triton), or None when torch should.

    Args:
        name: a kernel of :data:`moefy.kernels.library.KERNELS` (``expert_ffn``,
            ``routed_expert_ffn``, ``threshold_linear``, ``threshold_gate_up``).
        x: (N, ...) tokens.
        *weights: the weights the kernel streams.
        extras: the call's other tensors, or None for an absent one (biases, mask, router).
        contiguous: False when the kernel will read a contiguous copy of the weights.
        backend: auto / reference / cpu / triton for this call; default the one in force.

    Returns:
        :attr:`Backend.CPU` or :attr:`Backend.TRITON`, or None.

    Raises:
        MoefyError: an unknown kernel, or a backend that cannot run here (as
            :func:`moefy.kernels.set_backend`).

    Example:
        >>> kernel_fits("threshold_linear", x, weight_t, extras=(bias,))  # doctest: +SKIP
        <Backend.CPU: 'cpu'>
    """
    rule = KERNELS.get(name).value.weights_fit
    small = 0 < x.shape[0] <= SMALL_BATCH_MAX
    if not small and backend is None:
        return None  # the backend in force is not asked: no fallback warning on a prefill
    chosen = resolve(x.device, backend)  # a backend asked for this call is checked all the same
    if chosen is Backend.REFERENCE or not small:
        return None
    if not _tensors_fit(chosen, x, weights, extras, contiguous):
        return None
    if rule is not None and not rule(chosen, weights):
        return None
    return chosen


def _tensors_fit(
    chosen: Backend,
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    extras: tuple[torch.Tensor | None, ...],
    contiguous: bool,
) -> bool:
    # Asked on every decode step of every layer: attribute checks only.
    device, dtype = x.device, x.dtype
    if dtype not in _TOKEN_DTYPES[chosen]:
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    for weight in weights:
        if weight.dtype != dtype or weight.device != device or (grad and weight.requires_grad):
            return False
        if contiguous and not weight.is_contiguous():
            return False
    cpu = chosen is Backend.CPU  # the C++ kernels read float32 only (a mask may be bool)
    for extra in extras:
        if extra is None:
            continue
        if extra.device != device or (grad and extra.requires_grad):
            return False
        if cpu and extra.dtype != dtype and extra.is_floating_point():
            return False
    return True
