"""Top-k neurons (the Lazy Neuron Phenomenon): keep the ``k`` largest FFN activations per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moefy.sparsify.config import (
    CENTRES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MIN_CALIBRATION_TOKENS,
    SparsifyConfig,
)
from moefy.sparsify.methods.base import (
    Allocation,
    Calibration,
    MethodHandler,
    _check_reuse,
    _settings,
    ffn_weight_count,
    load_buffers,
    swap,
)
from moefy.sparsify.methods.registration import CENTRE, register_sparsify_method
from moefy.validate import check_choice, check_int


@dataclass(frozen=True)
class TopKConfig(SparsifyConfig):
    """Top-k neurons (the Lazy Neuron Phenomenon): keep the ``k`` largest FFN activations per token.

    The activations are the input of the down projection; ``k = d_ff - round(sparsity * d_ff)``.
    Needs no calibration unless centred. Only the down projection's columns are skipped: the
    ranking needs every activation, so the up (and gate) projections run in full.

    Attributes:
        centre: ``"none"``, or rank ``|a - c|`` with ``c`` each activation's ``"mode"``,
            ``"median"`` or ``"mean"`` on calibration text (SCAP), ``W_down @ c`` added back
            as a bias.
        batch_size: blocks per forward pass while estimating the centres.
        min_calibration_tokens: a centred top-k refuses shorter calibration text.

    Example:
        >>> TopKConfig(sparsity=0.75)
        >>> TopKConfig(sparsity=0.75, centre="mode")  # calibrates the centres
    """

    method: ClassVar[str] = "topk"

    centre: str = "none"
    batch_size: int = DEFAULT_BATCH_SIZE
    min_calibration_tokens: int = DEFAULT_MIN_CALIBRATION_TOKENS

    @property
    def needs_calibration(self) -> bool:
        return self.centre != "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("centre", self.centre, CENTRES)
        for name in ("batch_size", "min_calibration_tokens"):
            check_int(name, getattr(self, name), minimum=1)


class TopKHandler(MethodHandler):
    """Top-k on the input of every FFN's down projection."""

    def install(self, model, config):
        from moefy.arch import find_ffns
        from moefy.sparsify.centring import CentredTopKLinear
        from moefy.sparsify.wrappers import TopKLinear

        wrapper_cls = TopKLinear if config.centre == "none" else CentredTopKLinear
        wrapped = []
        for site in find_ffns(model):
            d_ff = site.weights().d_ff
            k = d_ff - round(config.sparsity * d_ff)
            wrapper = wrapper_cls(site.part("down"), layer=site.index, role=site.spec.down, k=k)
            wrapper.scope_weights = ffn_weight_count(site)  # gate and up run in full
            swap(model, site.module_path("down"), wrapper, wrapped)
        return wrapped

    def calibrate(self, model, wrapped, config, data, calibration, progress):
        calibration = self._centre(model, wrapped, config, data, calibration, progress)
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
        return allocations, calibration

    def _centre(self, model, wrapped, config, data, calibration, progress):
        """Set a centred top-k's centres (fitted, or from a reused calibration); None if not
        centred."""
        from moefy.sparsify.centring import centre_wrappers

        if config.centre == "none":
            return None
        paths = tuple(path for path, _ in wrapped)
        if calibration is not None:
            _check_reuse(calibration, config, paths)
            load_buffers(wrapped, calibration.buffers)
            return calibration
        return Calibration(
            method=config.method,
            settings=_settings(config),
            paths=paths,
            histograms={},
            buffers=centre_wrappers(model, wrapped, config, data, progress),
            n_tokens=data.n_tokens if data is not None else 0,
        )


register_sparsify_method(
    name="topk",
    config_cls=TopKConfig,
    handler=TopKHandler(),
    help="keep the k largest FFN activations per token (no calibration unless --centre)",
    cli_options=(CENTRE,),
)
