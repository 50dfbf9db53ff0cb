"""TEAL: magnitude thresholds on the inputs of the FFN's (optionally attention's) linear layers.

Shape legend:
    C: input channels of a linear layer
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moefy.sparsify.config import LayerwiseConfig
from moefy.sparsify.methods.base import _LayerwiseHandler
from moefy.sparsify.methods.registration import (
    CALIBRATED_OPTIONS,
    CENTRE,
    LAYERWISE_OPTIONS,
    register_sparsify_method,
)


@dataclass(frozen=True)
class TEALConfig(LayerwiseConfig):
    """TEAL: magnitude thresholds on the inputs of the FFN's (optionally attention's) linear layers.

    Entry ``x_i`` of a linear layer's input is zeroed when ``|x_i| <= t``; each layer's ``t`` is
    the quantile of ``|x|`` on calibration text that zeroes the layer's allocated share.

    Example:
        >>> TEALConfig(sparsity=0.5, attention=True)
    """

    method: ClassVar[str] = "teal"


class TEALHandler(_LayerwiseHandler):
    """TEAL: one ``|x|`` threshold per linear layer."""


register_sparsify_method(
    name="teal",
    config_cls=TEALConfig,
    handler=TEALHandler(),
    help="|x| thresholds on the inputs of every FFN (and attention) linear layer",
    cli_options=(*CALIBRATED_OPTIONS, *LAYERWISE_OPTIONS, CENTRE),
)
