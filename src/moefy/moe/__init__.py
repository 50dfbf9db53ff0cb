"""MoEfication: split dense FFNs into equal experts, run a selection of them, save and load.

The verb is :func:`moefy_` with a :class:`MoEfyConfig`; :func:`unmoefy` undoes it exactly.
"""

from moefy.moe.budget import BudgetReport, allocate_experts
from moefy.moe.config import ExpertLayout, MoEfyConfig
from moefy.moe.convert import moe_layers, moefy_, reset_tally, set_selection, unmoefy
from moefy.moe.flops import ffn_flops_per_token
from moefy.moe.module import MoEFFN
from moefy.moe.report import FlopsReport, LayerFlops, flops_report
from moefy.moe.selectors import (
    SELECTORS,
    ExpertSelector,
    OracleSelector,
    register_selector,
)
from moefy.moe.serialize import from_pretrained, save
from moefy.moe.split import (
    SPLIT_METHODS,
    SplitRequest,
    balanced_assign,
    balanced_kmeans,
    coactivation_partition,
    random_partition,
    register_split_method,
)
from moefy.moe.split_patterns import pattern_kmeans

__all__ = [
    "SELECTORS",
    "SPLIT_METHODS",
    "BudgetReport",
    "ExpertLayout",
    "ExpertSelector",
    "FlopsReport",
    "LayerFlops",
    "MoEFFN",
    "MoEfyConfig",
    "OracleSelector",
    "SplitRequest",
    "allocate_experts",
    "balanced_assign",
    "balanced_kmeans",
    "coactivation_partition",
    "ffn_flops_per_token",
    "flops_report",
    "from_pretrained",
    "moe_layers",
    "moefy_",
    "pattern_kmeans",
    "random_partition",
    "register_selector",
    "register_split_method",
    "reset_tally",
    "save",
    "set_selection",
    "unmoefy",
]
