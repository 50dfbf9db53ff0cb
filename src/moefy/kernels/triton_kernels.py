"""The Triton implementations of the kernels, under the kernels' names.

Shape legend:
    N: tokens, D: model width, E: experts

:mod:`moefy.kernels.library` registers these as the CUDA implementations of the
``torch.ops.moefy`` operators (and runs them on CPU tensors under Triton's interpreter), and
:mod:`moefy.kernels.ops` calls them directly in eager mode. Importing this module imports
triton: both import it only when a Triton kernel runs, so moefy works without triton installed.
"""

from __future__ import annotations

from moefy.kernels.reference import route
from moefy.kernels.triton_experts import expert_ffn
from moefy.kernels.triton_threshold import threshold_gate_up, threshold_linear


def routed_expert_ffn(x, layers, k, counts, tokens_seen, *experts):
    """(N, D): the router's top-``k`` in torch, then the Triton expert kernel; arguments as
    :func:`moefy.kernels.reference.routed_expert_ffn` (``experts``: w_in .. gated)."""
    mask = route(x, layers, k, counts, tokens_seen)  # (N, E)
    return expert_ffn(x, mask, *experts)


__all__ = ["expert_ffn", "routed_expert_ffn", "threshold_gate_up", "threshold_linear"]
