"""WINA: thresholds on ``|x_i| * ||W[:, i]||_2``, the activation weighted by its column's norm.

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
class WINAConfig(LayerwiseConfig):
    """WINA: zero ``x_i`` when ``|x_i| * ||W[:, i]||_2 <= t`` (activation times its column's norm).

    ``t`` per layer is calibrated like TEAL's; stored as one threshold per input channel,
    ``t / ||W[:, i]||``.

    Example:
        >>> WINAConfig(sparsity=0.5)
    """

    method: ClassVar[str] = "wina"


class WINAHandler(_LayerwiseHandler):
    """WINA: ``|x_i| * ||W[:, i]||`` thresholds, stored per input channel."""

    per_channel = True

    def channel_scales(self, model, wrapped, config, data, progress):
        from moefy.sparsify.wrappers import input_column_norms

        return [input_column_norms(wrapper.base_layer) for _, wrapper in wrapped]  # (C,) each


register_sparsify_method(
    name="wina",
    config_cls=WINAConfig,
    handler=WINAHandler(),
    help="|x_i| * ||W[:, i]|| thresholds on the inputs of every linear layer",
    cli_options=(*CALIBRATED_OPTIONS, *LAYERWISE_OPTIONS, CENTRE),
)
