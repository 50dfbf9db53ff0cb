"""The "activation" split: neurons that carry the same tokens go to the same expert.

Shape legend:
    F: neurons being split, T: sampled tokens of the activation patterns, K: feature width
    after projection, E: number of experts

A neuron's activation pattern is its share of the layer's output contribution on each of T
sampled tokens (see :meth:`moefy.profiling.SparsityProfile.activation_patterns`). Each pattern
row is centred (minus the neuron's mean share), so two neurons match when they rise and fall on
the same tokens rather than when both are simply large; then balanced spherical k-means
(:func:`moefy.moe.split.balanced_kmeans`) groups them into experts of exact sizes. Patterns can
be projected to fewer dimensions first (``dim``), but that is off by default: at 256 of 512
dimensions it lost about a tenth of the within-cluster similarity on SmolLM2, and without it a
Llama-3-8B-sized layer (14336 neurons, 896 experts) already splits in about 6.5 CPU seconds.

The assignment step of the Lloyd loop is either the Sinkhorn + greedy rounding of
:func:`~moefy.moe.split.balanced_kmeans` ("sinkhorn", the default) or an exact balanced
assignment ("exact": :func:`scipy.optimize.linear_sum_assignment` on neurons x expert slots).
Measured on SmolLM2 (d_ff 1536, S = 8 / 16 / 32), "sinkhorn" ends at an equal or slightly higher
within-cluster similarity in 3-10x less time; "exact" is cubic in F (about 50 CPU seconds per
step at 14336 neurons), so it only suits small layers (``benchmarks/split_quality.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from moefy.errors import MoefyError
from moefy.moe.split import SplitRequest, balanced_kmeans, register_split_method

ASSIGNMENTS = ("sinkhorn", "exact")
DEFAULT_ASSIGNMENT = "sinkhorn"


def pattern_features(
    patterns: torch.Tensor, *, seed: int = 0, dim: int | None = None
) -> torch.Tensor:
    """Centred (and, when long, projected) activation patterns: the rows k-means clusters.

    Args:
        patterns: (F, T) contribution share of each neuron on T sampled tokens.
        seed: seed of the Gaussian projection.
        dim: project rows longer than this to ``dim`` dimensions; None keeps all T.

    Returns:
        (F, K) float32 features: K = T, or min(T, dim) with ``dim``.

    Example:
        >>> pattern_features(torch.rand(32, 1024), dim=64).shape
        torch.Size([32, 64])
    """
    if patterns.ndim != 2:
        raise MoefyError(f"activation patterns must be (F, T), got shape {tuple(patterns.shape)}")
    centred = patterns.detach().float()
    centred = centred - centred.mean(dim=1, keepdim=True)  # (F, T)
    T = centred.shape[1]
    if dim is None or dim >= T:
        return centred
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(T, dim, generator=generator) / dim**0.5  # (T, K)
    return centred @ projection.to(centred.device)  # (F, K)


def exact_balanced_assign(scores: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """The assignment of rows to columns of given sizes that maximises the total score.

    Solves the linear assignment of the N rows to the ``capacities.sum()`` column slots (each
    column's score repeated once per slot) with :func:`scipy.optimize.linear_sum_assignment`.
    Exact, but cubic in N: under a second for N=1536, about 50 CPU seconds for N=14336.

    Args:
        scores: (N, E) preference of row n for column e (higher is better).
        capacities: (E,) room per column; ``capacities.sum() >= N``.

    Returns:
        (N,) int64 column of each row.

    Example:
        >>> exact_balanced_assign(torch.tensor([[1.0, 0.0], [0.9, 0.0]]), torch.tensor([1, 1]))
        tensor([0, 1])
    """
    from scipy.optimize import linear_sum_assignment

    capacities = capacities.long().cpu()
    N = scores.shape[0]
    if int(capacities.sum()) < N:
        raise MoefyError(f"capacities sum to {int(capacities.sum())} < {N} rows")
    slot_column = torch.repeat_interleave(torch.arange(capacities.numel()), capacities)  # (N',)
    cost = -scores.detach().double().cpu()[:, slot_column]  # (N, N') rows x slots
    rows, slots = linear_sum_assignment(cost.numpy())
    labels = torch.empty(N, dtype=torch.long)
    labels[torch.from_numpy(rows)] = slot_column[torch.from_numpy(slots)]
    return labels.to(scores.device)


def pattern_kmeans(
    patterns: torch.Tensor,
    capacities: torch.Tensor,
    *,
    seed: int = 0,
    assignment: str = DEFAULT_ASSIGNMENT,
    dim: int | None = None,
) -> torch.Tensor:
    """Cluster neurons on their centred activation patterns into experts of exact sizes.

    Args:
        patterns: (F, T) contribution share of each neuron on T sampled tokens.
        capacities: (E,) exact expert sizes, summing to F.
        seed: seed of the projection and of the k-means++ draw.
        assignment: "sinkhorn" (Sinkhorn + greedy rounding, fast) or "exact" (linear sum
            assignment on neurons x slots, cubic in F).
        dim: project pattern rows longer than this before clustering; None keeps all T.

    Returns:
        (F,) int64 expert of each neuron; ``bincount == capacities``.

    Example:
        >>> labels = pattern_kmeans(torch.rand(64, 100), torch.full((8,), 8), seed=0)
        >>> torch.bincount(labels).tolist()
        [8, 8, 8, 8, 8, 8, 8, 8]
    """
    if assignment not in ASSIGNMENTS:
        raise MoefyError(f"assignment must be one of {', '.join(ASSIGNMENTS)}, not {assignment!r}")
    features = pattern_features(patterns, seed=seed, dim=dim)  # (F, K)
    assign = exact_balanced_assign if assignment == "exact" else None
    return balanced_kmeans(features, capacities, seed=seed, assign=assign)


def within_cluster_similarity(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cosine similarity of the pairs of rows that share a cluster (the split's objective).

    Args:
        points: (N, K) rows (e.g. centred activation patterns).
        labels: (N,) cluster of each row.

    Returns:
        The mean over same-cluster pairs i != j of cos(points_i, points_j).

    Example:
        >>> within_cluster_similarity(torch.eye(2).repeat(2, 1), torch.tensor([0, 1, 0, 1]))
        1.0
    """
    unit = Fn.normalize(points.detach().double(), dim=1)  # (N, K)
    labels = labels.long().to(unit.device)
    sums = torch.zeros(int(labels.max()) + 1, unit.shape[1], dtype=unit.dtype, device=unit.device)
    sums.index_add_(0, labels, unit)  # (E, K)
    sizes = torch.bincount(labels).to(unit.dtype)  # (E,)
    self_similarity = unit.square().sum(dim=1)  # (N,) 1, or 0 for a zero row
    pair_sum = sums.square().sum() - self_similarity.sum()
    pairs = (sizes * (sizes - 1)).sum()
    return float(pair_sum / pairs) if float(pairs) > 0 else 0.0


@register_split_method(
    "activation",
    needs_patterns=True,
    help="balanced k-means on the neurons' centred activation patterns (needs a profile)",
)
def _split_activation(request: SplitRequest) -> torch.Tensor:
    assert request.patterns is not None
    F = request.layout.d_ff
    if request.patterns.ndim != 2 or request.patterns.shape[0] != F:
        raise MoefyError(
            f"activation patterns are {tuple(request.patterns.shape)}, the layer has d_ff={F}: "
            "use the profile of this model"
        )
    return pattern_kmeans(request.patterns, request.capacities, seed=request.seed)
