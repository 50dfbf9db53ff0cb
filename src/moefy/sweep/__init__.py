"""Sweeps: every method at several levels on one evaluation harness, cached, with an HTML report.

Example:
    >>> from moefy.sweep import SweepConfig, sweep
    >>> result = sweep(SweepConfig(methods=("moe-oracle", "teal", "cats"), levels=(0.5, 0.25)),
    ...                "runs/sweep")
    >>> result.report  # runs/sweep/report.html
"""

from moefy.sweep.methods import (
    METHODS,
    SweepContext,
    SweepMethod,
    get_method,
    method_names,
    register_method,
)
from moefy.sweep.report import curves, headline, render_report, write_report
from moefy.sweep.runner import SweepConfig, SweepResult, sweep

__all__ = [
    "METHODS",
    "SweepConfig",
    "SweepContext",
    "SweepMethod",
    "SweepResult",
    "curves",
    "get_method",
    "headline",
    "method_names",
    "register_method",
    "render_report",
    "sweep",
    "write_report",
]
