"""Routers and dynamic k: choose experts per token without the oracle.

The verb is :func:`train_routers` with a :class:`RouterConfig`; :func:`set_routing` picks the
selection rule (top-k, dynamic k, relative to max) with one budget or one per layer.
"""

from moefy.moe.selectors import SELECTION_RULES, dynamic_k_mask, relative_to_max_mask
from moefy.routing.balance import BalanceReport, ExpertUnion, balance_load, expert_union
from moefy.routing.closed_form import AnalyticRouter, ClosedFormRouter, LstsqRouter
from moefy.routing.config import RouterConfig
from moefy.routing.quality import route_quality
from moefy.routing.report import LayerRouterReport, RouterReport
from moefy.routing.routers import (
    ROUTERS,
    CentroidRouter,
    LinearRouter,
    MLPRouter,
    Router,
    attach_routers,
    register_router,
    set_routing,
)
from moefy.routing.train import train_routers

__all__ = [
    "ROUTERS",
    "SELECTION_RULES",
    "AnalyticRouter",
    "BalanceReport",
    "CentroidRouter",
    "ClosedFormRouter",
    "ExpertUnion",
    "LayerRouterReport",
    "LinearRouter",
    "LstsqRouter",
    "MLPRouter",
    "Router",
    "RouterConfig",
    "RouterReport",
    "attach_routers",
    "balance_load",
    "dynamic_k_mask",
    "expert_union",
    "register_router",
    "relative_to_max_mask",
    "route_quality",
    "set_routing",
    "train_routers",
]
