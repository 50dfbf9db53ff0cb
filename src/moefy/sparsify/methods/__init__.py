"""The training-free methods: one module per method, each holding its config class, its handler
and one :func:`register_sparsify_method` call.

A new method is one module in this package like :mod:`moefy.sparsify.methods.teal` (every module
here is imported with the package), or the same few lines in any file that runs before the
method is used. The registration fills ``sparsify_``'s dispatch, the config round trip,
``moefy sparsify``'s choices, help and options, and the sweep's methods. The built-in methods'
config and handler classes are importable from here by name.

Example:
    >>> from moefy.sparsify.methods import TEALConfig, handler_for
    >>> handler_for(TEALConfig())
    <moefy.sparsify.methods.teal.TEALHandler object at ...>
"""

import importlib
import pkgutil
from typing import Any

from moefy.sparsify.config import SPARSIFY_METHODS
from moefy.sparsify.methods.base import Allocation, Calibration, MethodHandler
from moefy.sparsify.methods.registration import (
    ATTENTION,
    CALIBRATED_OPTIONS,
    CALIBRATION_PASSES,
    DEFAULT_SWEEP_LEVELS,
    HANDLERS,
    LAYERWISE_OPTIONS,
    NO_GREEDY,
    MethodOption,
    handler_for,
    method_entry,
    method_options,
    methods_taking,
    register_method,
    register_sparsify_method,
    unregister_sparsify_method,
)


def _import_method_modules() -> None:
    """Import every module of this package, in name order: each method module registers its
    method (so the registration order, and the order of the CLI's choices, is the same whichever
    module was imported first)."""
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{module.name}")


_import_method_modules()


def __getattr__(name: str) -> Any:
    """A registered method's config or handler class by name (``TEALConfig``, ``TEALHandler``)."""
    for entry in SPARSIFY_METHODS.entries():
        for cls in (entry.meta["config_cls"], type(entry.value)):
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ATTENTION",
    "Allocation",
    "CALIBRATED_OPTIONS",
    "CALIBRATION_PASSES",
    "Calibration",
    "DEFAULT_SWEEP_LEVELS",
    "HANDLERS",
    "LAYERWISE_OPTIONS",
    "MethodHandler",
    "MethodOption",
    "NO_GREEDY",
    "handler_for",
    "method_entry",
    "method_options",
    "methods_taking",
    "register_method",
    "register_sparsify_method",
    "unregister_sparsify_method",
]
