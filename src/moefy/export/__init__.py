"""Export a moefied model to what serving engines load: a transformers Qwen2-MoE folder or a
llama.cpp GGUF file.

Example:
    >>> import moefy
    >>> moefy.set_routing(model, keep=0.25)
    >>> moefy.export(model, "runs/moe-hf", tokenizer=tokenizer, data=blocks)
    >>> moefy.export(model, "runs/moe.gguf", format="gguf", tokenizer=tokenizer, data=blocks)
"""

import sys
import types

from moefy.export.api import (
    EXPORT_FORMATS,
    ExportFormat,
    ExportReport,
    build_export_model,
    export,
    register_export_format,
)
from moefy.export.check import ExportCheck, compare_export
from moefy.export.routing import RouterFit, fit_routers

__all__ = [
    "EXPORT_FORMATS",
    "ExportCheck",
    "ExportFormat",
    "ExportReport",
    "RouterFit",
    "build_export_model",
    "compare_export",
    "export",
    "fit_routers",
    "register_export_format",
]


class _CallableModule(types.ModuleType):
    """This package, callable as its verb: importing ``moefy.export`` binds the package to the
    name ``moefy.export``, and ``moefy.export(model, path)`` must still export."""

    def __call__(self, *args, **kwargs) -> ExportReport:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
