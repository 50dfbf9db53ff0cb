"""Top-k neurons (the Lazy Neuron Phenomenon): keep the ``k`` largest FFN activations per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moefy.sparsify.config import SparsifyConfig
from moefy.sparsify.methods.base import Allocation, MethodHandler, ffn_weight_count, swap
from moefy.sparsify.methods.registration import register_sparsify_method


@dataclass(frozen=True)
class TopKConfig(SparsifyConfig):
    """Top-k neurons (the Lazy Neuron Phenomenon): keep the ``k`` largest FFN activations per token.

    The activations are the input of the down projection; ``k = d_ff - round(sparsity * d_ff)``.
    Needs no calibration. Only the down projection's columns are skipped: the ranking needs every
    activation, so the up (and gate) projections run in full.

    Example:
        >>> TopKConfig(sparsity=0.75)
    """

    method: ClassVar[str] = "topk"


class TopKHandler(MethodHandler):
    """Top-k on the input of every FFN's down projection."""

    def install(self, model, config):
        from moefy.arch import find_ffns
        from moefy.sparsify.wrappers import TopKLinear

        wrapped = []
        for site in find_ffns(model):
            d_ff = site.weights().d_ff
            k = d_ff - round(config.sparsity * d_ff)
            wrapper = TopKLinear(site.part("down"), layer=site.index, role=site.spec.down, k=k)
            wrapper.scope_weights = ffn_weight_count(site)  # gate and up run in full
            swap(model, site.module_path("down"), wrapper, wrapped)
        return wrapped

    def calibrate(self, model, wrapped, config, data, calibration, progress):
        allocations = [
            Allocation(
                path=path,
                layer=w.layer,
                role=w.role,
                sparsity=1.0 - w.k / w.in_features,
                criterion_threshold=None,
                calibration_sparsity=None,
            )
            for path, w in wrapped
        ]
        return allocations, None


register_sparsify_method(
    name="topk",
    config_cls=TopKConfig,
    handler=TopKHandler(),
    help="keep the k largest FFN activations per token (no calibration)",
)
