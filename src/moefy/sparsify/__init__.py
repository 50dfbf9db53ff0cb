"""Training-free activation sparsity: top-k, TEAL, WINA, CATS and CHESS behind one verb.

Example:
    >>> from moefy.sparsify import TEALConfig, measure, sparsify_, unsparsify
    >>> report = sparsify_(model, TEALConfig(sparsity=0.5), calibration_blocks)
    >>> measure(model, evaluation_blocks).total  # share of FFN weight reads skipped
    >>> unsparsify(model)  # the dense model again, exactly
"""

from moefy.sparsify.api import (
    LayerSparsity,
    ModuleSparsity,
    SparsifyReport,
    SparsityMeasurement,
    check_calibration_text,
    measure,
    measured_sparsity,
    sparsify_,
    sparsify_config_of,
)
from moefy.sparsify.attention import ATTENTION_PROJECTIONS, register_attention_projections
from moefy.sparsify.config import (
    CONFIG_CLASSES,
    CATSConfig,
    CHESSConfig,
    SparsifyConfig,
    TEALConfig,
    TopKConfig,
    WINAConfig,
    config_from_dict,
    config_from_json,
)
from moefy.sparsify.methods import (
    HANDLERS,
    Allocation,
    Calibration,
    MethodHandler,
    register_method,
)
from moefy.sparsify.saving import load_sparse, save_sparse
from moefy.sparsify.wrappers import (
    SparseModule,
    ThresholdActivation,
    ThresholdLinear,
    TopKLinear,
    reset_counters,
    unsparsify,
)

__all__ = [
    "ATTENTION_PROJECTIONS",
    "Allocation",
    "CATSConfig",
    "CHESSConfig",
    "CONFIG_CLASSES",
    "Calibration",
    "HANDLERS",
    "LayerSparsity",
    "MethodHandler",
    "ModuleSparsity",
    "SparseModule",
    "SparsifyConfig",
    "SparsifyReport",
    "SparsityMeasurement",
    "TEALConfig",
    "ThresholdActivation",
    "ThresholdLinear",
    "TopKConfig",
    "TopKLinear",
    "WINAConfig",
    "check_calibration_text",
    "config_from_dict",
    "config_from_json",
    "load_sparse",
    "measure",
    "measured_sparsity",
    "register_attention_projections",
    "register_method",
    "reset_counters",
    "save_sparse",
    "sparsify_",
    "sparsify_config_of",
    "unsparsify",
]
