"""CHESS channel-wise thresholding: one threshold per FFN neuron of gated FFNs.

Shape legend:
    N: tokens of a batch, F: FFN neurons
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moefy.sparsify.config import CalibratedConfig
from moefy.sparsify.methods.cats import CATSHandler
from moefy.sparsify.methods.registration import CALIBRATED_OPTIONS, register_sparsify_method


@dataclass(frozen=True)
class CHESSConfig(CalibratedConfig):
    """CHESS channel-wise thresholding: one threshold per FFN neuron.

    Neuron ``i`` is zeroed when ``|act(gate_i(x))| * E|up_i(x)| <= t``, with ``E|up_i|`` the mean
    magnitude of the neuron's up activation on calibration text; stored as the per-neuron
    threshold ``t / E|up_i|``. Only for gated FFNs; up and down skip the zeroed neurons.

    Example:
        >>> CHESSConfig(sparsity=0.5)
    """

    method: ClassVar[str] = "chess"


class CHESSHandler(CATSHandler):
    """One threshold per neuron: ``|act(gate_i)| * E|up_i| <= t``."""

    method_name = "CHESS"
    per_channel = True

    def channel_scales(self, model, wrapped, config, data, progress):
        import torch

        from moefy.arch import find_ffns
        from moefy.dist import all_reduce_sum_
        from moefy.sparsify import calibrate as cal

        sites = {site.index: site for site in find_ffns(model)}
        device = cal.device_of(model)
        wrappers = [wrapper for _, wrapper in wrapped]
        # Per wrapper: sum of |up| per neuron (F,) and the token count; reduced as one tensor.
        sums = [torch.zeros(w.d_ff + 1, dtype=torch.float64, device=device) for w in wrappers]
        handles = []
        try:
            for i, wrapper in enumerate(wrappers):
                site = sites[wrapper.layer]
                hook = _accumulate_up(sums[i], site.spec.fused_gate_up)
                handles.append(site.part("up").register_forward_hook(hook))
            cal.stream_ffns(
                model,
                data,
                config.batch_size,
                desc="up statistics",
                progress=progress,
            )
        finally:
            for handle in handles:
                handle.remove()
        totals = all_reduce_sum_(torch.cat(sums)).split([w.d_ff + 1 for w in wrappers])
        # (F,) mean |up_i| per neuron of each layer
        return [(total[:-1] / total[-1].clamp_min(1.0)).float() for total in totals]


def _accumulate_up(total, fused: bool):
    """A forward hook adding ``|up|`` per neuron to ``total[:-1]`` and the tokens to
    ``total[-1]``; ``fused``: the module returns ``[gate; up]``."""

    def _hook(_module, _args, out):
        up = out[..., out.shape[-1] // 2 :] if fused else out  # (..., F): up half of [gate; up]
        up = up.detach().abs().double().reshape(-1, up.shape[-1])  # (N, F)
        total[:-1] += up.sum(dim=0)
        total[-1] += up.shape[0]

    return _hook


register_sparsify_method(
    name="chess",
    config_cls=CHESSConfig,
    handler=CHESSHandler(),
    help="one |act(gate_i(x))| * E|up_i| threshold per gated FFN neuron",
    cli_options=CALIBRATED_OPTIONS,
)
