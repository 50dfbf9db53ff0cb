"""SCAP: TEAL's thresholds on mode-centred inputs (arXiv 2412.07174).

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
class SCAPConfig(LayerwiseConfig):
    """SCAP: zero ``x_i - c_i`` when ``|x_i - c_i| <= t``, ``c`` each input channel's mode.

    The mode of every input channel of the FFN's (optionally attention's) linear layers is
    estimated on calibration text; the layer thresholds the centred input and adds ``W @ c``
    back as a bias (exact when nothing is dropped). ``t`` per layer is calibrated like TEAL's,
    on ``|x - c|``. ``centre="median"`` or ``"mean"`` change the centre; ``"none"`` is TEAL.

    Example:
        >>> SCAPConfig(sparsity=0.5)
        >>> SCAPConfig(sparsity=0.5, centre="median", attention=True)
    """

    method: ClassVar[str] = "scap"

    centre: str = "mode"


class SCAPHandler(_LayerwiseHandler):
    """SCAP: one ``|x - c|`` threshold per linear layer, ``c`` fitted in ``prepare``."""


register_sparsify_method(
    name="scap",
    config_cls=SCAPConfig,
    handler=SCAPHandler(),
    help="|x - mode| thresholds on the inputs of every FFN (and attention) linear layer",
    cli_options=(*CALIBRATED_OPTIONS, *LAYERWISE_OPTIONS, CENTRE),
)
