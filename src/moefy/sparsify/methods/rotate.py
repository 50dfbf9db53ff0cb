"""rotate (LaRoSa): thresholds on linear layers' inputs in the basis of their principal components.

Per block, the FFN input (read by gate and up) and, with ``attention=True``, the attention input
(read by q, k and v) are rotated by an orthogonal ``Q`` fitted on calibration text: the
eigenvectors of ``x^T x``, largest first. Each projection reads the rotated input through its
rotated weight ``W Q`` (:class:`moefy.sparsify.rotation.RotatedLinear`), thresholded like TEAL's
and calibrated by the same histograms and greedy search. The down projection (its input is the
FFN width wide: rotating it would cost more than the projection) and the attention output
projection keep TEAL's plain threshold.

Shape legend:
    C: input channels of a rotated linear layer, G: rotation groups
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from moefy.errors import MoefyError
from moefy.sparsify.config import LayerwiseConfig
from moefy.sparsify.methods.base import _LayerwiseHandler, swap
from moefy.sparsify.methods.registration import (
    CALIBRATED_OPTIONS,
    LAYERWISE_OPTIONS,
    register_sparsify_method,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from moefy.arch import FFNSite
    from moefy.data.blocks import TokenBlocks
    from moefy.sparsify.methods.base import Wrapped
    from moefy.sparsify.rotation import RotatedLinear


@dataclass(frozen=True)
class RotateConfig(LayerwiseConfig):
    """rotate (LaRoSa): TEAL's thresholds on inputs rotated into their principal components.

    The rotation of each shared input (gate/up; q/k/v with ``attention``) is the PCA of its
    calibration activations (leaving out the first ``greedy_sink_positions`` of each block),
    folded into the weights that read it; computing it online costs ``C * C`` multiply-adds per
    token and input, counted in the measured FLOPs.

    Example:
        >>> RotateConfig(sparsity=0.5)
    """

    method: ClassVar[str] = "rotate"
    takes_centre: ClassVar[bool] = False


class RotateHandler(_LayerwiseHandler):
    """Rotated thresholds on gate/up (and q/k/v), TEAL's on down (and o)."""

    def install(self, model: nn.Module, config: LayerwiseConfig) -> Wrapped:
        from moefy.arch import find_ffns
        from moefy.sparsify.wrappers import ThresholdLinear

        wrapped: Wrapped = []
        names = {id(module): name for name, module in model.named_modules()}
        for site in find_ffns(model):
            if config.attention:
                self._install_attention(model, site, names[id(site.block)], wrapped)
            parts = [p for p in ("gate", "up") if getattr(site.spec, p) is not None]
            _install_group(
                model,
                [(site.module_path(p), getattr(site.spec, p)) for p in parts],
                site.index,
                wrapped,
            )
            down = ThresholdLinear(site.part("down"), layer=site.index, role=site.spec.down)
            swap(model, site.module_path("down"), down, wrapped)
        return wrapped

    def _install_attention(
        self, model: nn.Module, site: FFNSite, block_path: str, wrapped: Wrapped
    ) -> None:
        """q/k/v (or a fused qkv) of each attention module rotated as one group; the last
        projection of each (the output) thresholded as TEAL does."""
        from moefy.arch import attention_projection_paths
        from moefy.sparsify.wrappers import ThresholdLinear

        by_parent: dict[str, list[str]] = {}
        for relative in attention_projection_paths(model, site.block):
            by_parent.setdefault(relative.rpartition(".")[0], []).append(relative)
        for relatives in by_parent.values():
            *inputs, output = relatives
            paths = [(f"{block_path}.{r}", r) for r in inputs]
            _install_group(model, paths, site.index, wrapped)
            out_path = f"{block_path}.{output}"
            wrapper = ThresholdLinear(_projection(model, out_path), layer=site.index, role=output)
            swap(model, out_path, wrapper, wrapped)

    def prepare(self, model, wrapped, config, data, progress):
        from moefy.sparsify.rotation import principal_rotation

        moments = _input_moments(model, wrapped, config, data, progress)  # group -> (C, C)
        buffers: dict[str, dict[str, torch.Tensor]] = {}
        for shared, moment in moments.items():
            rotation = principal_rotation(moment).float()  # (C, C)
            for path, wrapper in _members(wrapped, shared):
                wrapper.rotation.copy_(rotation)
                buffers[path] = {"rotation": rotation}
        return buffers


def _projection(model: nn.Module, path: str) -> nn.Module:
    from moefy.arch import model_type_of

    try:
        return model.get_submodule(path)
    except AttributeError:
        raise MoefyError(
            f"{model_type_of(model)}: no attention projection at {path}; fix its entry with "
            "moefy.arch.register_attention_projections"
        ) from None


def _install_group(
    model: nn.Module, paths: list[tuple[str, str]], layer: int, wrapped: Wrapped
) -> None:
    """Swap in one :class:`RotatedLinear` per ``(path, role)``, all sharing one rotation."""
    from moefy.sparsify.rotation import RotatedLinear, SharedRotation, check_foldable
    from moefy.sparsify.wrappers import linear_shape

    layers = [(path, _projection(model, path)) for path, _ in paths]
    check_foldable(layers)
    if not layers:
        return
    shared = SharedRotation(members=len(layers))
    channels = linear_shape(layers[0][1])[1]
    overhead = channels * channels  # one (C, C) rotation per token, split over the group
    for index, ((path, role), (_, base)) in enumerate(zip(paths, layers, strict=True)):
        share = overhead // len(layers) + (1 if index < overhead % len(layers) else 0)
        wrapper = RotatedLinear(base, layer=layer, role=role, shared=shared, overhead_weights=share)
        swap(model, path, wrapper, wrapped)


def _members(wrapped: Wrapped, shared: object) -> list[tuple[str, RotatedLinear]]:
    return [(p, w) for p, w in wrapped if getattr(w, "shared", None) is shared]


def _input_moments(
    model: nn.Module,
    wrapped: Wrapped,
    config: LayerwiseConfig,
    data: TokenBlocks,
    progress: bool,
) -> dict[object, torch.Tensor]:
    """(C, C) float64 ``x^T x`` of each rotation group's input over ``data`` (sink positions
    left out), summed over ranks; refuses groups whose members read different inputs."""
    import torch

    from moefy.dist import all_reduce_sum_
    from moefy.sparsify import calibrate as cal
    from moefy.sparsify.rotation import RotatedLinear

    groups: dict[object, list[tuple[str, RotatedLinear]]] = {}
    for path, wrapper in wrapped:
        if isinstance(wrapper, RotatedLinear):
            groups.setdefault(wrapper.shared, []).append((path, wrapper))
    device = cal.device_of(model)
    moments = {
        shared: torch.zeros(
            m[0][1].in_features, m[0][1].in_features, dtype=torch.float64, device=device
        )
        for shared, m in groups.items()
    }
    mismatched: list[str] = []
    rounds: dict[object, list] = {shared: [None, 0] for shared in groups}  # [input, calls]

    def _hook(shared: object, path: str):
        def _read(_module: nn.Module, args: tuple) -> None:
            x, state = args[0], rounds[shared]
            if state[0] is None or state[1] >= len(groups[shared]):
                state[0], state[1] = x, 0
                skip = config.greedy_sink_positions if x.dim() >= 3 else 0
                kept = x[:, skip:] if x.dim() >= 3 and x.shape[1] > skip else x
                tokens = kept.reshape(-1, x.shape[-1]).float()  # (N, C)
                moments[shared] += (tokens.T @ tokens).double()
            elif x is not state[0] and path not in mismatched:
                mismatched.append(path)
            state[1] += 1

        return _read

    handles = [
        wrapper.register_forward_pre_hook(_hook(shared, path))
        for shared, members in groups.items()
        for path, wrapper in members
    ]
    try:
        cal.stream_ffns(
            model,
            data,
            config.batch_size,
            desc="rotations",
            progress=progress,
        )
    finally:
        for handle in handles:
            handle.remove()
    if mismatched:
        raise MoefyError(
            f"rotate shares one rotation between projections that read one input, and "
            f"{', '.join(mismatched[:4])} read{'s' if len(mismatched) == 1 else ''} another "
            "input than the first projection of its group (cross-attention?): use "
            "attention=False or teal"
        )
    stacked = all_reduce_sum_(torch.stack(list(moments.values())))  # (G, C, C)
    return dict(zip(moments, stacked.unbind(0), strict=True))


register_sparsify_method(
    name="rotate",
    config_cls=RotateConfig,
    handler=RotateHandler(),
    help="|x Q| thresholds, Q the PCA rotation of each layer input folded into its weights",
    cli_options=(*CALIBRATED_OPTIONS, *LAYERWISE_OPTIONS),
)
