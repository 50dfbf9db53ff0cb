"""CATS: one threshold per layer on the gate activation ``|act(gate(x))|`` of gated FFNs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moefy.sparsify.config import CalibratedConfig
from moefy.sparsify.methods.base import _ThresholdHandler, require_gated, swap
from moefy.sparsify.methods.registration import CALIBRATED_OPTIONS, register_sparsify_method


@dataclass(frozen=True)
class CATSConfig(CalibratedConfig):
    """CATS: zero neuron ``i`` when ``|act(gate_i(x))| <= t``; up and down then skip it.

    Only for gated FFNs. ``t`` per layer is the quantile of ``|act(gate(x))|`` that zeroes
    ``sparsity`` of the neurons on calibration text.

    Example:
        >>> CATSConfig(sparsity=0.5)
    """

    method: ClassVar[str] = "cats"


class CATSHandler(_ThresholdHandler):
    """One threshold per layer on ``|act(gate(x))|``."""

    method_name = "CATS"

    def install(self, model, config):
        from moefy.arch import find_ffns
        from moefy.sparsify.wrappers import ThresholdActivation

        wrapped = []
        for site in find_ffns(model):
            require_gated(site, model, self.method_name)
            weights = site.weights()
            wrapper = ThresholdActivation(
                site.part("act"),
                layer=site.index,
                role=site.spec.act,
                d_model=weights.d_model,
                d_ff=weights.d_ff,
                per_channel=self.per_channel,
            )
            swap(model, site.module_path("act"), wrapper, wrapped)
        return wrapped


register_sparsify_method(
    name="cats",
    config_cls=CATSConfig,
    handler=CATSHandler(),
    help="one |act(gate(x))| threshold per gated FFN",
    cli_options=CALIBRATED_OPTIONS,
)
