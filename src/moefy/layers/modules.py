"""Stand-ins for dropped layers: modules that compute nothing and keep no KV cache.

A dropped attention sublayer returns zeros (the residual stream passes unchanged), a dropped MLP
returns zeros, a dropped block returns its input. Each keeps the module it replaced as
``base_layer`` (as peft does) unless dropped with ``keep_weights=False``, so
:func:`moefy.layers.restore_layers` can put it back and ``state_dict`` stays the whole truth.
Through the cost protocol of :mod:`moefy.cost` each reports that it spends nothing.

KV cache: transformers 5 caches (``DynamicCache``) hold one layer object per block, created from
the config (or lazily on first update), and read the sequence length and mask sizes from the first
attention layer (layer 0 by default). A dropped attention layer would leave its slot empty, so a
model whose layer 0 is dropped would restart positions at 0 on every decode step. The stand-ins
therefore put transformers' own ``DummyLayer`` (its slot for attention-free layers: it stores
nothing, and ``get_seq_length`` and the mask builders skip it) into their slot of whatever cache
the model passes them. transformers before 5.23 has no ``DummyLayer``; there the slot gets
:class:`EmptyCacheLayer`, which those versions skip the same way (they pass over any slot that is
not a ``CacheLayerMixin``, as they do for linear-attention layers).

Shape legend:
    B: batch, T: tokens, D: model width (d_model)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moefy.cost import NOTHING, ModuleCost


class EmptyCacheLayer:
    """A KV-cache slot that stores nothing: transformers' ``DummyLayer`` for versions before 5.23.

    Not a ``CacheLayerMixin``, so ``Cache.get_seq_length`` and the mask sizes read the first real
    attention layer instead; the cache-wide operations (reset, crop, beam reorder, ...) do nothing.
    """

    is_compileable = True
    is_croppable = True
    is_sliding = False
    is_initialized = True
    supports_early_init = False  # StaticCache's early initialisation skips it
    keys = None
    values = None

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
        if key_states is None and value_states is None:
            return None, None
        raise NotImplementedError("a dropped attention layer's cache slot stores nothing")

    def offload(self) -> None: ...
    def prefetch(self) -> None: ...
    def reset(self) -> None: ...
    def crop(self, max_length: int) -> None: ...
    def reorder_cache(self, beam_idx: torch.Tensor) -> None: ...
    def batch_repeat_interleave(self, repeats: int) -> None: ...
    def batch_select_indices(self, indices: torch.Tensor) -> None: ...

    def get_max_length(self) -> int:
        return -1


def empty_cache_layer_class() -> type:
    """transformers' ``DummyLayer`` (5.23 and later), else :class:`EmptyCacheLayer`."""
    try:
        from transformers.cache_utils import DummyLayer
    except ImportError:
        return EmptyCacheLayer
    return DummyLayer


def release_cache_slot(cache: Any, layer_idx: int) -> None:
    """Make slot ``layer_idx`` of a transformers KV cache a layer that stores nothing.

    The layer is transformers' ``DummyLayer``, or :class:`EmptyCacheLayer` where transformers
    has none (see :func:`empty_cache_layer_class`).

    Args:
        cache: a ``transformers.Cache`` (an ``EncoderDecoderCache`` means its self-attention
            part); anything without cache layers is left alone.
        layer_idx: the attention layer's cache index.
    """
    empty = empty_cache_layer_class()
    cache = getattr(cache, "self_attention_cache", cache)
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return
    if layer_idx < len(layers) and isinstance(layers[layer_idx], empty):
        return
    # A lazily built cache appends one layer per update: give it the slots up to ours.
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while replicate is not None and len(layers) <= layer_idx:
        layers.append(replicate())
    if layer_idx < len(layers):
        layers[layer_idx] = empty()


def _cache_argument(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The KV cache among a layer's arguments (``past_key_values``, ``layer_past``, ...)."""
    from transformers.cache_utils import Cache

    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


class _DroppedLayer(nn.Module):
    """Common part of the stand-ins: the marker, the kept module and the cache index."""

    moefy_dropped = True  # moefy.arch.registry.DROPPED_MARK: find_ffns refuses dropped MLPs

    def __init__(self, layer_idx: int, base_layer: nn.Module | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.base_layer = base_layer

    def measured_cost(self) -> ModuleCost:
        """A dropped part computes nothing and reads no weight, kept ones included (cost
        protocol of :mod:`moefy.cost`)."""
        return NOTHING

    def reset_counters(self) -> None:
        """Nothing is counted: a dropped part always costs nothing."""

    def extra_repr(self) -> str:
        kept = "kept" if self.base_layer is not None else "freed"
        return f"layer_idx={self.layer_idx}, weights={kept}"


class DroppedAttention(_DroppedLayer):
    """A removed attention sublayer: adds nothing to the residual stream, caches nothing.

    Called like the attention it replaces; returns ``(zeros, None)`` in the place of
    ``(attn_output, attn_weights)``.

    Args:
        layer_idx: the attention's cache index (its ``layer_idx``).
        base_layer: the attention module, kept for :func:`restore_layers`, or None.
    """

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        cache = _cache_argument(args, kwargs)
        if cache is not None:
            release_cache_slot(cache, self.layer_idx)
        return torch.zeros_like(hidden_states), None  # (B, T, D), no attention weights


class DroppedMLP(_DroppedLayer):
    """A removed MLP: its output is zero, so the block adds nothing.

    For an inline FFN (OPT) it takes the ``up`` slot and ``nn.Identity`` the ``act`` and
    ``down`` slots, so the block's ``fc2(act(fc1(x)))`` is zero.

    Args:
        layer_idx: the block number.
        base_layer: the replaced modules by slot (``{"ffn": mlp}`` or ``{"up": fc1, ...}``),
            or None.
    """

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)  # (..., D)


class DroppedBlock(_DroppedLayer):
    """A removed block: returns its input hidden states and caches nothing.

    Args:
        layer_idx: the cache index of the block's attention.
        base_layer: the block, or None.
    """

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        cache = _cache_argument(args, kwargs)
        if cache is not None:
            release_cache_slot(cache, self.layer_idx)
        return hidden_states  # (B, T, D)
