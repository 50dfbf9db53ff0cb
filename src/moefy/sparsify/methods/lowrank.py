"""R-Sparse: TEAL's thresholds, with the dropped input entries applied through a rank-r
factorisation of each weight instead of being lost (``y = W x_kept + U (V x_dropped)``).

Shape legend:
    I: input features of a linear layer, O: its output features, r: rank of its factorisation
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
    RANK,
    register_sparsify_method,
)
from moefy.validate import check_choice, check_int

if TYPE_CHECKING:
    import torch
    from torch import nn

    from moefy.data.blocks import TokenBlocks
    from moefy.sparsify.methods.base import Wrapped

DEFAULT_RANK = 16
# What the factors are fitted to preserve: the weight alone ("svd"), the weight on inputs of the
# calibration text's channel RMS ("rms", ASVD), on the entries a threshold drops ("dropped",
# their per-channel RMS) or on the full second moment of those entries ("whitened", SVD-LLM's).
FACTORISATIONS = ("svd", "rms", "dropped", "whitened")
# On SmolLM2-135M's FFNs (ranks 8-32, 50 % and 65 % sparsity) "svd" and "dropped" leave the same
# share of TEAL's error, "whitened" is within 2 % either way, "rms" is worst (it spends the rank
# on the outlier channels, which are kept anyway): "svd" needs no pass over the text.
DEFAULT_FACTORISATION = "svd"
# The entries "dropped" and "whitened" fit on: those at or below each token's median |x| (the
# factors are shared by every sparsity of a reused calibration; 0.5 sits between the levels used).
DROPPED_REFERENCE_SHARE = 0.5


@dataclass(frozen=True)
class LowRankConfig(LayerwiseConfig):
    """R-Sparse: TEAL's thresholds plus a rank-r correction for the dropped input entries.

    Each wrapped linear layer computes ``W x_kept + U (V x_dropped) + b``: the entries above the
    threshold through the exact weight, the rest through ``U (O, r) V (r, I) ~ W``. The
    correction costs ``r (I + O)`` multiply-adds per token, which the budget pays for by
    dropping more entries (a block still spends ``1 - sparsity`` of its dense FLOPs).

    Attributes:
        rank: r, the number of singular directions kept per projection (a count, not a share:
            at most ``min(I, O)`` of every wrapped layer; 0 is plain TEAL).
        role_ranks: ``((role, rank), ...)`` overriding ``rank`` for the layers of a role, e.g.
            ``(("down_proj", 32),)``; roles as in the sparsify report (``gate_proj``,
            ``self_attn.q_proj``, ...).
        factorisation: what ``U V`` is fitted to: ``"svd"`` (the weight's truncated SVD),
            ``"rms"`` (weighted by each input channel's RMS on the calibration text, ASVD),
            ``"dropped"`` (weighted by each channel's RMS over the entries a threshold would
            drop) or ``"whitened"`` (the full second moment of those entries, SVD-LLM).

    Example:
        >>> LowRankConfig(sparsity=0.5, rank=16, role_ranks=(("down_proj", 32),))
    """

    method: ClassVar[str] = "lowrank"
    takes_centre: ClassVar[bool] = False

    rank: int = DEFAULT_RANK
    role_ranks: tuple[tuple[str, int], ...] = ()
    factorisation: str = DEFAULT_FACTORISATION

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rank", self.rank, minimum=0)
        pairs = self.role_ranks if isinstance(self.role_ranks, (list, tuple)) else [None]
        for pair in pairs:
            if not (
                isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)
            ):
                raise MoefyError(f"role_ranks must hold (role, rank) pairs, got {pair!r}")
            check_int(f"role_ranks[{pair[0]!r}]", pair[1], minimum=0)
        # JSON gives lists back: keep the pairs as tuples, so that configs compare and hash
        object.__setattr__(self, "role_ranks", tuple(tuple(pair) for pair in pairs))
        check_choice("factorisation", self.factorisation, FACTORISATIONS)
        if getattr(self, "centre", "none") != "none":
            raise MoefyError("lowrank does not centre its inputs: leave centre at 'none'")

    def rank_of(self, role: str) -> int:
        """The rank of the layers of ``role``."""
        return dict(self.role_ranks).get(role, self.rank)


class LowRankHandler(_LayerwiseHandler):
    """R-Sparse: TEAL's wrappers become :class:`moefy.sparsify.lowrank.LowRankLinear`, whose
    factors are fitted (in :meth:`prepare`) before the thresholds are calibrated."""

    def install(self, model: nn.Module, config: LowRankConfig) -> Wrapped:
        from moefy.arch.spec import set_submodule
        from moefy.sparsify.lowrank import LowRankLinear

        plain = super().install(model, config)
        try:
            ranks = _ranks(plain, config)
        except MoefyError:
            for path, wrapper in plain:  # leave the model as it came
                set_submodule(model, path, wrapper.base_layer)
            raise
        wrapped: Wrapped = []
        for (path, wrapper), rank in zip(plain, ranks, strict=True):
            low_rank = LowRankLinear(
                wrapper.base_layer,
                layer=wrapper.layer,
                role=wrapper.role,
                rank=rank,
                per_channel=self.per_channel,
            )
            swap(model, path, low_rank, wrapped)
        return wrapped

    def prepare(
        self,
        model: nn.Module,
        wrapped: Wrapped,
        config: LowRankConfig,
        data: TokenBlocks,
        progress: bool,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Fit every wrapper's factors (see :func:`moefy.sparsify.lowrank.low_rank_factors`)."""
        from moefy.sparsify.lowrank import dense_weight, low_rank_factors

        moments = _second_moments(model, wrapped, config, data, progress)
        buffers = {}
        for (path, wrapper), moment in zip(wrapped, moments, strict=True):
            if wrapper.rank == 0:
                continue
            u, v = low_rank_factors(dense_weight(wrapper.base_layer), wrapper.rank, moment)
            wrapper.set_factors(u, v)
            buffers[path] = {
                "factor_u": wrapper.factor_u.detach().clone(),
                "factor_v": wrapper.factor_v.detach().clone(),
            }
        return buffers


def _ranks(wrapped: Wrapped, config: LowRankConfig) -> list[int]:
    """The rank of each wrapper; a one-line error for a rank its matrix cannot have."""
    roles = {wrapper.role for _, wrapper in wrapped}
    unknown = sorted(role for role, _ in config.role_ranks if role not in roles)
    if unknown:
        raise MoefyError(
            f"lowrank: role_ranks names {', '.join(unknown)}, which this model's wrapped layers "
            f"lack; their roles: {', '.join(sorted(roles))}"
        )
    ranks = []
    for path, wrapper in wrapped:
        rank = config.rank_of(wrapper.role)
        largest = min(wrapper.in_features, wrapper.out_features)
        if rank > largest:
            raise MoefyError(
                f"lowrank: rank {rank} exceeds {path} ({wrapper.out_features}x"
                f"{wrapper.in_features}), whose rank is at most {largest}: pass --rank {largest} "
                "or less"
            )
        ranks.append(rank)
    return ranks


def _second_moments(
    model: nn.Module,
    wrapped: Wrapped,
    config: LowRankConfig,
    data: TokenBlocks,
    progress: bool,
) -> list[torch.Tensor | None]:
    """Per wrapper, the second moment its factors are fitted to (None: the identity)."""
    import torch

    from moefy.dist import all_reduce_sum_
    from moefy.sparsify import calibrate as cal
    from moefy.sparsify.lowrank import SecondMoment

    if config.factorisation == "svd":
        return [None] * len(wrapped)
    share = 1.0 if config.factorisation == "rms" else DROPPED_REFERENCE_SHARE
    full = config.factorisation == "whitened"
    moments = [
        SecondMoment(wrapper.in_features, full=full, reference_share=share)
        for _, wrapper in wrapped
    ]
    with cal.observing([w for _, w in wrapped], [m.add for m in moments]):
        cal.stream_ffns(
            model,
            data,
            config.batch_size,
            desc="low-rank statistics",
            progress=progress,
        )
    results = []
    for moment in moments:
        total = all_reduce_sum_(moment.total)
        count = all_reduce_sum_(torch.tensor(float(moment.count), dtype=torch.float64))
        results.append(total / count.clamp_min(1.0).to(total.device))
    return results


register_sparsify_method(
    name="lowrank",
    config_cls=LowRankConfig,
    handler=LowRankHandler(),
    help="R-Sparse: |x| thresholds, the dropped entries applied through a rank-r factorisation",
    cli_options=(*CALIBRATED_OPTIONS, *LAYERWISE_OPTIONS, RANK),
)
