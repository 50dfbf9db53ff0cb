"""Activation-sparsity profiler: how sparse is each FFN layer, and in which sense."""

from moefy.profiling.config import ProfileConfig
from moefy.profiling.plots import write_plots
from moefy.profiling.profiler import profile
from moefy.profiling.result import LayerSparsity, SparsityProfile, model_fingerprint

__all__ = [
    "LayerSparsity",
    "ProfileConfig",
    "SparsityProfile",
    "model_fingerprint",
    "profile",
    "write_plots",
]
