"""Where each architecture keeps its attention projections: a table keyed by ``config.model_type``.

Paths are relative to the transformer block that holds the FFN (``FFNSite.block``). An entry is a
tuple of paths, or a function ``block -> paths`` when blocks of one model differ (T5's decoder
blocks add cross-attention). Fused projections (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``) are one
linear layer with one input, so they are one entry.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from moefy.arch import model_type_of
from moefy.errors import MoefyError

ProjectionPaths = tuple[str, ...] | Callable[[nn.Module], tuple[str, ...]]

_LLAMA_LIKE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_T5_SELF = tuple(f"layer.0.SelfAttention.{p}" for p in "qkvo")
_T5_CROSS = tuple(f"layer.1.EncDecAttention.{p}" for p in "qkvo")


def _t5_paths(block: nn.Module) -> tuple[str, ...]:
    is_decoder = bool(getattr(block, "is_decoder", False)) or len(getattr(block, "layer", ())) == 3
    return _T5_SELF + _T5_CROSS if is_decoder else _T5_SELF


ATTENTION_PROJECTIONS: dict[str, ProjectionPaths] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "gpt_neox": ("attention.query_key_value", "attention.dense"),
    "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    "bert": (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
    ),
    "t5": _t5_paths,
}


def register_attention_projections(
    model_type: str, paths: ProjectionPaths, *, overwrite: bool = False
) -> None:
    """Teach moefy where an architecture's attention projections are (relative to its blocks).

    Args:
        model_type: ``config.model_type``, or the class name of a model without a config.
        paths: dotted paths inside one block, or a function ``block -> paths``.
        overwrite: replace an existing entry.

    Example:
        >>> register_attention_projections("mymodel", ("attn.wq", "attn.wk", "attn.wv", "attn.wo"))
    """
    if model_type in ATTENTION_PROJECTIONS and not overwrite:
        raise MoefyError(
            f"attention projections of {model_type!r} are registered already; pass overwrite=True"
        )
    ATTENTION_PROJECTIONS[model_type] = paths


def attention_projection_paths(model: nn.Module, block: nn.Module) -> tuple[str, ...]:
    """The attention projection paths (relative to ``block``) of ``model``'s architecture."""
    model_type = model_type_of(model)
    entry = ATTENTION_PROJECTIONS.get(model_type)
    if entry is None:
        raise MoefyError(
            f"no attention projections known for {model_type!r}: register them with "
            f"moefy.sparsify.register_attention_projections({model_type!r}, ('attn.q', ...)) "
            "or sparsify the FFN only (attention=False)"
        )
    return entry if isinstance(entry, tuple) else entry(block)
