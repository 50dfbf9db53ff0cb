"""The Triton implementations of the kernels, under the kernels' names.

Shape legend:
    N: tokens, D: model width, E: experts

:mod:`moefy.kernels.library` registers these as the CUDA implementations of the
``torch.ops.moefy`` operators (and runs them on CPU tensors under Triton's interpreter), and
:mod:`moefy.kernels.ops` calls them directly in eager mode. Importing this module imports
triton: both import it only when a Triton kernel runs, so moefy works without triton installed.
"""

from __future__ import annotations

from moefy.kernels.reference import route_then
from moefy.kernels.triton_experts import expert_ffn
from moefy.kernels.triton_threshold import threshold_gate_up, threshold_linear

# (N, D): the router's top-k in torch, then this module's (Triton) expert_ffn
routed_expert_ffn = route_then(globals())

__all__ = ["expert_ffn", "routed_expert_ffn", "threshold_gate_up", "threshold_linear"]
