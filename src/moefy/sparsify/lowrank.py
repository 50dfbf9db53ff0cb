"""Sparse plus low-rank linear layers (R-Sparse): the kept input channels go through the exact
weights, the dropped ones through a rank-r factorisation of the same weights.

``y = W x_kept + U (V x_dropped) + b`` with ``x_kept + x_dropped = x``: a threshold splits the
input as TEAL's does, and the dropped entries, instead of being lost, are applied through
``U V ~ W``. With ``r`` far below ``min(I, O)`` the correction costs ``r (I + O)`` multiply-adds
per token, and the threshold is raised to pay for it.

The factors are fitted by :func:`low_rank_factors`: ``U`` spans the top-``r`` directions of
``W C W^T`` for a second moment ``C`` of the inputs the factors will see, and ``V = U^T W`` (the
projection of ``W`` on them), which minimises ``E ||(W - U V) d||^2`` over inputs ``d`` of second
moment ``C`` (C = identity: plain SVD; diagonal: ASVD's channel weighting; full: SVD-LLM's).

Shape legend:
    N: tokens (any leading dims), I: input features of a linear layer, O: its output features,
    r: rank of the factorisation
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moefy.cost import tensor_bytes
from moefy.sparsify.wrappers import ThresholdLinear

__all__ = ["LowRankLinear", "SecondMoment", "dense_weight", "low_rank_factors"]

# ridge added to a full second moment before its Cholesky factor, relative to its mean diagonal
RIDGE = 1e-6


def dense_weight(module: nn.Module) -> torch.Tensor:
    """(O, I) float64 weight of a Linear layer or a GPT-2 ``Conv1D`` (stored (I, O))."""
    weight = module.weight.detach().double()
    return weight if isinstance(module, nn.Linear) else weight.t()


def low_rank_factors(
    weight: torch.Tensor, rank: int, second_moment: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` factors ``U (O, r)``, ``V (r, I)`` minimising ``E ||(W - U V) d||^2``.

    ``U`` holds the top-``r`` left singular vectors of ``W L`` (``L L^T = C``, the inputs'
    second moment) and ``V = U^T W``. The eigenproblem is solved in the smaller of ``O`` and
    ``I``, so the cost is that of a ``min(O, I)``-sized eigendecomposition.

    Args:
        weight: (O, I) dense weight.
        rank: r, at most ``min(O, I)``.
        second_moment: ``C = E[d d^T]`` of the inputs the factors apply to: (I, I), or (I,) for
            its diagonal only, or None for the identity (the plain truncated SVD of ``weight``).

    Returns:
        ``(U, V)`` in float64, ``U`` with orthonormal columns; ``U @ V == weight`` at full rank.

    Example:
        >>> u, v = low_rank_factors(torch.randn(6, 4, dtype=torch.float64), 2)
        >>> u.shape, v.shape
        (torch.Size([6, 2]), torch.Size([2, 4]))
    """
    weight = weight.double()
    out_features, in_features = weight.shape
    if rank == min(out_features, in_features):  # every direction: exact whatever C is
        u = torch.linalg.svd(weight, full_matrices=False).U  # (O, r)
        return u, u.t() @ weight
    scaled = _whitened(weight, second_moment)  # (O, I): W L
    if out_features <= in_features:
        u = _top_eigenvectors(scaled @ scaled.t(), rank)  # (O, r)
    else:
        u = scaled @ _top_eigenvectors(scaled.t() @ scaled, rank)  # (O, r): sigma_j u_j
    u = torch.linalg.qr(u).Q  # orthonormal even where sigma_j is ~0
    return u, u.t() @ weight  # (O, r), (r, I)


def _whitened(weight: torch.Tensor, second_moment: torch.Tensor | None) -> torch.Tensor:
    """(O, I) ``W L`` with ``L L^T = C``: ``W`` itself, ``W diag(sqrt(c))`` or ``W chol(C)``."""
    if second_moment is None:
        return weight
    moment = second_moment.double().to(weight.device)
    if moment.dim() == 1:
        return weight * moment.clamp_min(0.0).sqrt()
    # a small ridge keeps the Cholesky factor defined for channels that never vary
    ridge = RIDGE * float(moment.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    eye = torch.eye(moment.shape[0], dtype=torch.float64, device=moment.device)
    return weight @ torch.linalg.cholesky(moment + ridge * eye)


def _top_eigenvectors(gram: torch.Tensor, count: int) -> torch.Tensor:
    """(n, count) eigenvectors of the symmetric (n, n) ``gram`` with the largest eigenvalues.

    Solved in float32 (several times faster; the leading vectors are what matters), returned
    in float64.
    """
    symmetric = ((gram + gram.t()) / 2).float()
    _, vectors = torch.linalg.eigh(symmetric)  # ascending eigenvalues
    return vectors[:, vectors.shape[1] - count :].flip(1).double()


class SecondMoment:
    """Streams ``E[d d^T]`` (or its diagonal) of a layer's inputs into a fixed-size sum.

    ``d`` is the input with its largest entries removed: each token keeps only the entries at or
    below its ``reference_share`` quantile of ``|x|`` (those a threshold at that sparsity would
    drop, which are what the factors will see); a share of 1 keeps every entry (ASVD's statistic).

    Example:
        >>> moment = SecondMoment(8, full=False, reference_share=0.5)
        >>> moment.add(torch.randn(16, 8))
        >>> (moment.total / moment.count).shape
        torch.Size([8])
    """

    def __init__(self, features: int, *, full: bool, reference_share: float) -> None:
        shape = (features, features) if full else (features,)
        self.total = torch.zeros(shape, dtype=torch.float64)
        self.count = 0
        self.full = full
        self.reference_share = reference_share

    def add(self, x: torch.Tensor) -> None:
        """Add the (..., I) inputs of one forward pass."""
        tokens = x.detach().reshape(-1, x.shape[-1]).double()  # (N, I)
        if self.reference_share < 1.0:
            k = max(1, int(self.reference_share * tokens.shape[1]))
            bound = tokens.abs().kthvalue(k, dim=1, keepdim=True).values  # (N, 1)
            tokens = tokens.masked_fill(tokens.abs() > bound, 0.0)
        if self.total.device != tokens.device:
            self.total = self.total.to(tokens.device)
        if self.full:
            self.total += tokens.t() @ tokens  # (I, I)
        else:
            self.total += (tokens * tokens).sum(dim=0)  # (I,)
        self.count += tokens.shape[0]


class LowRankLinear(ThresholdLinear):
    """A threshold on the input, the exact weights for the kept entries and a rank-r correction
    ``U (V x_dropped)`` for the dropped ones.

    Attributes:
        factor_u: buffer (O, r), in the weight's dtype.
        factor_v: buffer (r, I).
        rank: r (0: a plain TEAL threshold).
        overhead_weights: ``r (I + O)`` multiply-adds per token for the correction.

    Example:
        >>> layer = LowRankLinear(nn.Linear(8, 4), layer=0, role="up_proj", rank=2)
        >>> layer.set_factors(*low_rank_factors(dense_weight(layer.base_layer), 2))
        >>> layer.threshold.fill_(0.5)
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        layer: int,
        role: str,
        rank: int,
        per_channel: bool = False,
    ) -> None:
        super().__init__(base_layer, layer=layer, role=role, per_channel=per_channel)
        weight = base_layer.weight
        like = {"dtype": weight.dtype, "device": weight.device}
        self.rank = rank
        self.overhead_weights = rank * (self.in_features + self.out_features)
        self.register_buffer("factor_u", torch.zeros(self.out_features, rank, **like))
        self.register_buffer("factor_v", torch.zeros(rank, self.in_features, **like))

    def set_factors(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Copy fitted (O, r) and (r, I) factors into the buffers (cast to their dtype)."""
        with torch.no_grad():
            self.factor_u.copy_(u)
            self.factor_v.copy_(v)

    def kept_weight_bytes(self) -> float:
        """The kept share of the layer's weights plus both factors, read by every token."""
        return super().kept_weight_bytes() + tensor_bytes([self.factor_u, self.factor_v])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # (..., O): W x_kept + b, by the kernel or the masked path
        if self.rank == 0:
            return out
        dropped = x.masked_fill(x.abs() > self.threshold, 0.0)  # (..., I): x - x_kept
        return out + F.linear(F.linear(dropped, self.factor_v), self.factor_u)  # (..., r) -> O

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
