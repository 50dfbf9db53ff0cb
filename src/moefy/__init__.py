"""moefy: turn the activation sparsity of Transformer FFNs into cheaper, faster inference.

The public verbs, configs and results are importable from here; submodules load on first use so
``import moefy`` (and ``moefy --help``) stays fast.

Example:
    >>> import moefy
    >>> model, tokenizer = moefy.load_model("smollm2-135m")
    >>> blocks = moefy.load_text("bbc-news").blocks(tokenizer, n_tokens=8192)
    >>> prof = moefy.profile(model, blocks)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # architectures
    "FFNSpec": "moefy.arch",
    "register_architecture": "moefy.arch",
    "find_ffns": "moefy.arch",
    # models and text
    "load_model": "moefy.models.load",
    # saved models: one format for every change moefy makes
    "save": "moefy.saving",
    "load": "moefy.models.load",
    "load_text": "moefy.data.text",
    # export to standard MoE checkpoints (transformers Qwen2-MoE, GGUF)
    "export": "moefy.export",
    "TokenBlocks": "moefy.data.blocks",
    "TextSource": "moefy.data.text",
    # evaluation
    "perplexity": "moefy.eval.perplexity",
    "PerplexityResult": "moefy.eval.perplexity",
    "evaluate": "moefy.eval",
    "EvalConfig": "moefy.eval",
    "EvalReport": "moefy.eval",
    "dense_reference": "moefy.eval",
    "sweep": "moefy.sweep",
    "SweepConfig": "moefy.sweep",
    "SweepResult": "moefy.sweep",
    # profiling
    "profile": "moefy.profiling",
    "ProfileConfig": "moefy.profiling",
    "SparsityProfile": "moefy.profiling",
    # MoEfication
    "moefy_": "moefy.moe",
    "carve_": "moefy.carve",
    "CarveConfig": "moefy.carve",
    "allocate_experts": "moefy.moe",
    "unmoefy": "moefy.moe",
    "MoEfyConfig": "moefy.moe",
    "MoEFFN": "moefy.moe",
    "set_selection": "moefy.moe",
    "flops_report": "moefy.moe",
    "ffn_flops_per_token": "moefy.moe",
    "from_pretrained": "moefy.moe",
    "split_quality": "moefy.moe.quality",
    # routers
    "train_routers": "moefy.routing",
    "RouterConfig": "moefy.routing",
    "RouterReport": "moefy.routing",
    "set_routing": "moefy.routing",
    "attach_routers": "moefy.routing",
    "route_quality": "moefy.routing",
    # training-free sparsity
    "sparsify_": "moefy.sparsify",
    "unsparsify": "moefy.sparsify",
    "TopKConfig": "moefy.sparsify",
    "TEALConfig": "moefy.sparsify",
    "CATSConfig": "moefy.sparsify",
    "CHESSConfig": "moefy.sparsify",
    "WINAConfig": "moefy.sparsify",
    "SCAPConfig": "moefy.sparsify",
    "RotateConfig": "moefy.sparsify",
    "LowRankConfig": "moefy.sparsify",
    "SparsifyReport": "moefy.sparsify",
    "SparsityMeasurement": "moefy.sparsify",
    "measure": "moefy.sparsify",
    "measured_sparsity": "moefy.sparsify",
    "reset_counters": "moefy.sparsify",
    "save_sparse": "moefy.sparsify",
    "load_sparse": "moefy.sparsify",
    # layer redundancy
    "layer_importance": "moefy.layers",
    "LayerImportance": "moefy.layers",
    "LayerImportanceConfig": "moefy.layers",
    "DropConfig": "moefy.layers",
    "drop_layers_": "moefy.layers",
    "restore_layers": "moefy.layers",
    "dropped_layers": "moefy.layers",
    "apply_layer_method": "moefy.layers",
    "save_dropped": "moefy.layers",
    "load_dropped": "moefy.layers",
    # sparsity-raising training
    "relufy_": "moefy.finetune",
    "finetune": "moefy.finetune",
    "FinetuneConfig": "moefy.finetune",
    "FinetuneReport": "moefy.finetune",
    "FATReLU": "moefy.finetune",
    # errors
    "MoefyError": "moefy.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'moefy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
