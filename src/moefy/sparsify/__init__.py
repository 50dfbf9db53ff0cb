"""Training-free activation sparsity: top-k, TEAL, WINA, CATS and CHESS behind one verb.

Each method is one module of :mod:`moefy.sparsify.methods` (config, handler, registration).
Names load on first use, so the CLI reads the registered methods without importing torch; the
config class of any registered method, built-in or not, is importable from here by name.

Example:
    >>> from moefy.sparsify import TEALConfig, measure, sparsify_, unsparsify
    >>> report = sparsify_(model, TEALConfig(sparsity=0.5), calibration_blocks)
    >>> measure(model, evaluation_blocks).total  # share of FFN weight reads skipped
    >>> unsparsify(model)  # the dense model again, exactly
"""

from __future__ import annotations

import importlib
from typing import Any

from moefy.sparsify.config import SPARSIFY_METHODS

_API = "moefy.sparsify.api"
_CONFIG = "moefy.sparsify.config"
_METHODS = "moefy.sparsify.methods"
_WRAPPERS = "moefy.sparsify.wrappers"

# public name -> module that defines it
_EXPORTS = {
    "LayerSparsity": _API,
    "ModuleSparsity": _API,
    "SparsifyReport": _API,
    "SparsityMeasurement": _API,
    "check_calibration_text": _API,
    "check_method": _API,
    "measure": _API,
    "measured_sparsity": _API,
    "sparsify_": _API,
    "sparsify_config_of": _API,
    "register_attention_projections": "moefy.arch",
    "CONFIG_CLASSES": _CONFIG,
    "SPARSIFY_METHODS": _CONFIG,
    "SparsifyConfig": _CONFIG,
    "config_from_dict": _CONFIG,
    "config_from_json": _CONFIG,
    "HANDLERS": _METHODS,
    "Allocation": _METHODS,
    "Calibration": _METHODS,
    "MethodHandler": _METHODS,
    "MethodOption": _METHODS,
    "register_method": _METHODS,
    "register_sparsify_method": _METHODS,
    "unregister_sparsify_method": _METHODS,
    "CATSConfig": _METHODS,
    "CHESSConfig": _METHODS,
    "TEALConfig": _METHODS,
    "TopKConfig": _METHODS,
    "WINAConfig": _METHODS,
    "SCAPConfig": _METHODS,
    "RotateConfig": _METHODS,
    "LowRankConfig": _METHODS,
    "load_sparse": "moefy.sparsify.saving",
    "save_sparse": "moefy.sparsify.saving",
    "SparseModule": _WRAPPERS,
    "ThresholdActivation": _WRAPPERS,
    "ThresholdLinear": _WRAPPERS,
    "TopKLinear": _WRAPPERS,
    "reset_counters": _WRAPPERS,
    "unsparsify": _WRAPPERS,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is not None:
        return getattr(importlib.import_module(module_name), name)
    # the config class of any registered method (``moefy.sparsify.HalfZeroConfig``)
    for entry in SPARSIFY_METHODS.entries():
        if entry.meta["config_cls"].__name__ == name:
            return entry.meta["config_cls"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
