"""The Triton kernels behind the same signatures as :mod:`moefy.kernels.reference`.

Importing this module imports triton; :mod:`moefy.kernels.ops` does so only when the triton
backend runs, so moefy and its CPU paths work without triton installed.
"""

from moefy.kernels.triton_experts import expert_ffn
from moefy.kernels.triton_threshold import threshold_gate_up, threshold_linear

__all__ = ["expert_ffn", "threshold_gate_up", "threshold_linear"]
