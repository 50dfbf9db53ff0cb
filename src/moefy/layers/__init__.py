"""Layer redundancy: measure which blocks, attention sublayers and MLPs a decoder can lose
(LLM-Drop's similarity, perplexity without each part), drop them so generation still works,
skip balanced middle blocks (Unified Layer Skipping), and save and load the result.

Example:
    >>> importance = layer_importance(model, blocks)
    >>> apply_layer_method(model, "drop-attn", 4, importance)
    >>> save_dropped(model, "runs/drop-attn-4", tokenizer=tokenizer)
"""

from moefy.layers.choose import (
    LAYER_METHODS,
    apply_layer_method,
    blocks_for_speedup,
    plan_most_redundant,
    plan_uniform_skip,
)
from moefy.layers.config import DropConfig, LayerImportanceConfig
from moefy.layers.drop import check_drop, drop_layers_, dropped_layers, restore_layers
from moefy.layers.importance import layer_importance
from moefy.layers.modules import DroppedAttention, DroppedBlock, DroppedMLP
from moefy.layers.result import LayerImportance, LayerScores
from moefy.layers.saving import load_dropped, save_dropped
from moefy.layers.sites import PARTS, LayerSite, find_layers

__all__ = [
    "LAYER_METHODS",
    "PARTS",
    "DropConfig",
    "DroppedAttention",
    "DroppedBlock",
    "DroppedMLP",
    "LayerImportance",
    "LayerImportanceConfig",
    "LayerScores",
    "LayerSite",
    "apply_layer_method",
    "blocks_for_speedup",
    "check_drop",
    "drop_layers_",
    "dropped_layers",
    "find_layers",
    "layer_importance",
    "load_dropped",
    "plan_most_redundant",
    "plan_uniform_skip",
    "restore_layers",
    "save_dropped",
]
