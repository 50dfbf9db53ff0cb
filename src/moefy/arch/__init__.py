"""FFN adapters: one table of architectures and a canonical view of every FFN."""

from moefy.arch.registry import (
    ARCHITECTURES,
    attention_projection_paths,
    find_ffns,
    get_spec,
    model_type_of,
    register_architecture,
    register_attention_projections,
    replace_ffn,
    restore_ffn,
)
from moefy.arch.spec import FFNSite, FFNSpec, FFNWeights

__all__ = [
    "ARCHITECTURES",
    "FFNSite",
    "FFNSpec",
    "FFNWeights",
    "attention_projection_paths",
    "find_ffns",
    "get_spec",
    "model_type_of",
    "register_architecture",
    "register_attention_projections",
    "replace_ffn",
    "restore_ffn",
]
