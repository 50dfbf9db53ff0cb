"""Split methods: which neurons of a dense FFN go to which expert.

Shape legend:
    F: FFN width (d_ff, neurons), D: model width, K: feature width of a neuron,
    E: number of experts

Every method returns ``labels``, an (F,) int64 tensor of expert ids whose counts equal the
layout's ``real_sizes`` exactly (balanced experts), and is reproducible for a given seed.
Methods are looked up by name in :data:`SPLIT_METHODS` (a :class:`moefy.registry.Registry`);
adding one is a function plus one :func:`register_split_method` call above it.

The balanced clustering here replaces the constrained k-means of research code (a min-cost-flow
per iteration, minutes per layer) by spherical k-means whose assignment step is a Sinkhorn
balancing of the (F, E) similarity matrix followed by an exact greedy rounding; all steps are
vectorised torch, so a d_ff=11008 layer splits into 128 experts in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from moefy.arch.spec import FFNWeights
from moefy.errors import MoefyError
from moefy.moe.layout import ExpertLayout
from moefy.registry import Registry

KMEANS_ITERATIONS = 25
# Sinkhorn temperature relative to the spread (std) of the similarities.
SINKHORN_TEMPERATURE = 0.1
SINKHORN_ITERATIONS = 30
SINKHORN_WARM_ITERATIONS = 10
# Lloyd iterations stop once at most this fraction of neurons changes expert.
KMEANS_TOLERANCE = 0.002
# k-means++ seeding measures angles in a random projection of at most this many dimensions.
SEEDING_DIM = 256
_TINY = 1e-300
_TINY_SPREAD = 1e-6
# The co-activation graph is complete up to this many edges (every neuron pair: best measured
# quality); above it, each neuron keeps its strongest EDGE_BUDGET // F neighbours, which bounds
# METIS time and memory (d_ff=11008 keeps 381). Affinities become integer edge weights.
EDGE_BUDGET = 1 << 22
EDGE_WEIGHT_SCALE = 1000
# METIS imbalance tolerance in 1/1000 (1 = 0.1 %, its tightest); exact balance is restored after.
METIS_UFACTOR = 1


@dataclass(frozen=True)
class SplitRequest:
    """Everything a split method may use for one FFN layer.

    Attributes:
        weights: the canonical dense weights of the layer.
        layout: the expert layout (E and real neurons per expert).
        seed: seed for this layer.
        coactivation: (F, F) co-activation counts, for methods that need a profile.
        patterns: (F, T) activation patterns of the neurons over T sampled tokens (see
            :meth:`moefy.profiling.SparsityProfile.activation_patterns`), for methods that
            need them.
    """

    weights: FFNWeights
    layout: ExpertLayout
    seed: int
    coactivation: torch.Tensor | None = None
    patterns: torch.Tensor | None = None

    @property
    def capacities(self) -> torch.Tensor:
        """(E,) real neurons per expert."""
        return torch.tensor(self.layout.real_sizes, dtype=torch.long)


SplitFn = Callable[[SplitRequest], torch.Tensor]
# (scores (N, E), capacities (E,)) -> (N,) labels with bincount == capacities
AssignFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SplitMethod:
    """A registered split method.

    Attributes:
        split: ``request -> labels`` (F,) int64.
        needs_coactivation: the method reads ``request.coactivation`` (needs a profile).
        needs_patterns: the method reads ``request.patterns`` (needs a profile with
            activation patterns).
    """

    split: SplitFn
    needs_coactivation: bool = False
    needs_patterns: bool = False


SPLIT_METHODS: Registry[SplitMethod] = Registry("split method")


def register_split_method(
    name: str,
    *,
    needs_coactivation: bool = False,
    needs_patterns: bool = False,
    help: str = "",
    overwrite: bool = False,  # noqa: A002
) -> Callable[[SplitFn], SplitFn]:
    """Register a split method under ``name`` (a decorator).

    Args:
        name: the value of ``MoEfyConfig.method`` that selects it.
        needs_coactivation: the method needs co-activation counts from a profile.
        needs_patterns: the method needs activation patterns from a profile.
        help: one line for ``moefy splits`` and the docs.
        overwrite: replace an existing method of that name.

    Returns:
        The decorator; it returns the function unchanged.

    Example:
        >>> @register_split_method("contiguous", help="neurons in dense order")
        ... def contiguous(request):
        ...     sizes = request.capacities
        ...     return torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    """

    def decorator(fn: SplitFn) -> SplitFn:
        method = SplitMethod(
            split=fn, needs_coactivation=needs_coactivation, needs_patterns=needs_patterns
        )
        SPLIT_METHODS.register(name, method, help=help, overwrite=overwrite)
        return fn

    return decorator


def split_neurons(method: str, request: SplitRequest) -> torch.Tensor:
    """Run the split method ``method`` and check that its experts are balanced.

    Args:
        method: a name in :data:`SPLIT_METHODS`.
        request: the layer to split.

    Returns:
        (E, S) int64 slot table: the dense neuron index in each expert slot, -1 for padding.
    """
    entry = SPLIT_METHODS.get(method).value
    if entry.needs_coactivation and request.coactivation is None:
        raise MoefyError(f"split method {method!r} needs co-activation counts: pass profile=")
    if entry.needs_patterns and request.patterns is None:
        raise MoefyError(
            f"split method {method!r} needs activation patterns: pass profile= (a profile made "
            "by moefy profile)"
        )
    labels = entry.split(request)
    return expert_slots(labels, request.layout)


def expert_slots(labels: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Turn per-neuron expert labels into the (E, S) slot table of an :class:`ExpertLayout`.

    Neurons keep ascending dense order inside an expert; padding slots (-1) come last.

    Args:
        labels: (F,) expert id of each neuron.
        layout: the layout whose ``real_sizes`` the labels must match.

    Returns:
        (E, S) int64 dense neuron index per slot, -1 where the slot is padding.

    Example:
        >>> layout = ExpertLayout(num_experts=2, expert_size=2, real_sizes=(2, 2))
        >>> expert_slots(torch.tensor([1, 0, 1, 0]), layout)
        tensor([[1, 3],
                [0, 2]])
    """
    E, S = layout.num_experts, layout.expert_size
    labels = labels.long().cpu()
    if labels.shape != (layout.d_ff,):
        raise MoefyError(f"split gave labels of shape {tuple(labels.shape)}, not ({layout.d_ff},)")
    if labels.numel() and (labels.min() < 0 or labels.max() >= E):
        raise MoefyError(f"split gave expert ids outside [0, {E})")
    counts = torch.bincount(labels, minlength=E)
    expected = torch.tensor(layout.real_sizes)
    if not torch.equal(counts, expected):
        raise MoefyError(
            f"split is unbalanced: expert sizes {counts.tolist()} instead of {list(expected)}"
        )
    order = torch.argsort(labels, stable=True)  # (F,) neurons grouped by expert
    starts = torch.cumsum(counts, 0) - counts
    grouped = labels[order]
    slots = torch.full((E, S), -1, dtype=torch.long)
    slots[grouped, torch.arange(layout.d_ff) - starts[grouped]] = order
    return slots


# --------------------------------------------------------------------------- balanced assignment


def balanced_assign(scores: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """Assign each row to a column, at most ``capacities[e]`` rows per column, greedily by score.

    Rounds of proposals: each unassigned row proposes to its best column that still has room,
    and each column accepts its highest-scoring proposers up to its remaining room. Every round
    fills a column or ends the assignment, so there are at most E rounds.

    Args:
        scores: (N, E) preference of row n for column e (higher is better).
        capacities: (E,) room per column; ``capacities.sum() >= N``.

    Returns:
        (N,) int64 column of each row.

    Example:
        >>> balanced_assign(torch.tensor([[1.0, 0.0], [0.9, 0.0]]), torch.tensor([1, 1]))
        tensor([0, 1])
    """
    N, E = scores.shape
    remaining = capacities.to(device=scores.device, dtype=torch.long).clone()
    if int(remaining.sum()) < N:
        raise MoefyError(f"capacities sum to {int(remaining.sum())} < {N} rows")
    labels = torch.full((N,), -1, dtype=torch.long, device=scores.device)
    unassigned = torch.arange(N, device=scores.device)
    neg_inf = torch.finfo(scores.dtype).min
    while unassigned.numel():
        pending = scores if unassigned.numel() == N else scores.index_select(0, unassigned)
        pending = pending.masked_fill(remaining == 0, neg_inf)  # (U, E)
        best_score, best = pending.max(dim=1)
        # Group proposals by column, best score first within a column.
        order = torch.argsort(best_score, descending=True, stable=True)
        order = order[torch.argsort(best[order], stable=True)]
        column = best[order]
        counts = torch.bincount(column, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(column.numel(), device=scores.device) - starts[column]
        accept = rank < remaining[column]
        labels[unassigned[order[accept]]] = column[accept]
        remaining -= torch.bincount(column[accept], minlength=E)
        unassigned = unassigned[order[~accept]]
    return labels


def _sinkhorn_balance(
    logits: torch.Tensor, capacities: torch.Tensor, col: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn scaling: row and column log-potentials making exp(logits + f + g) balanced.

    Rows get mass 1, column e gets ``capacities[e]``. Works in the exp domain in float64 (two
    matrix-vector products per iteration) after shifting each row by its maximum. Returns
    ``(f (N,), g (E,))``; ``col`` warm-starts g.
    """
    logits = logits.double()
    shift = logits.max(dim=1, keepdim=True).values  # (N, 1)
    kernel = (logits - shift).exp_()  # (N, E), row maxima are 1
    cap = capacities.to(kernel)
    v = col.double().exp()
    u = 1.0 / (kernel @ v)
    for _ in range(iterations):
        v = cap / (kernel.T @ u).clamp_min(_TINY)
        u = 1.0 / (kernel @ v).clamp_min(_TINY)
    row = u.log() - shift.squeeze(1)
    return row.float(), v.log().float()


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on unit rows with cosine distance; returns the k chosen row indices.

    Distances are taken in a seeded Gaussian projection to at most ``SEEDING_DIM`` dimensions,
    which preserves angles well enough for seeding and makes the k sequential passes cheap.
    """
    N, K = points.shape
    if K > SEEDING_DIM:
        # drawn on the CPU generator (the same projection on every device), then moved
        projection = torch.randn(K, SEEDING_DIM, generator=generator, dtype=points.dtype)
        points = Fn.normalize(points @ projection.to(points.device), dim=1)  # (N, SEEDING_DIM)
    first = int(torch.randint(N, (1,), generator=generator))
    chosen = [first]
    distance = (1.0 - points @ points[first]).clamp_min(0.0)  # (N,)
    for _ in range(1, k):
        weights = distance.square()
        if float(weights.sum()) <= 0.0:  # fewer distinct points than clusters
            index = int(torch.randint(N, (1,), generator=generator))
        else:
            # a seeded draw needs the CPU generator: N weights to the host, k times in all
            index = int(torch.multinomial(weights.cpu(), 1, generator=generator))
        chosen.append(index)
        distance = torch.minimum(distance, (1.0 - points @ points[index]).clamp_min(0.0))
    return torch.tensor(chosen)


def balanced_kmeans(
    points: torch.Tensor,
    capacities: torch.Tensor,
    *,
    seed: int = 0,
    iterations: int = KMEANS_ITERATIONS,
    assign: AssignFn | None = None,
) -> torch.Tensor:
    """Balanced spherical k-means: cluster rows by direction into clusters of given sizes.

    Rows are L2-normalised; centroids start from k-means++. Each assignment step balances the
    cosine similarities with Sinkhorn (warm-started column prices) and rounds the result to
    exact sizes with :func:`balanced_assign`; the loop stops when at most ``KMEANS_TOLERANCE``
    of the rows change cluster.

    Args:
        points: (N, K) rows to cluster.
        capacities: (E,) exact cluster sizes, summing to N.
        seed: seed of the k-means++ draw.
        iterations: maximum Lloyd iterations.
        assign: ``(similarity (N, E), capacities) -> labels`` replacing the Sinkhorn + greedy
            assignment step (e.g. an exact one); None keeps Sinkhorn + greedy.

    Returns:
        (N,) int64 cluster of each row; ``bincount == capacities``.

    Example:
        >>> labels = balanced_kmeans(torch.randn(64, 8), torch.full((4,), 16), seed=0)
        >>> torch.bincount(labels).tolist()
        [16, 16, 16, 16]
    """
    capacities = capacities.long()
    N, E = points.shape[0], capacities.numel()
    if int(capacities.sum()) != N:
        raise MoefyError(f"capacities sum to {int(capacities.sum())}, not to {N} rows")
    X = Fn.normalize(points.detach().float(), dim=1)  # (N, K)
    generator = torch.Generator().manual_seed(seed)
    centroids = X[_kmeans_plus_plus(X, E, generator)]  # (E, K)
    col = torch.zeros(E, device=X.device)
    labels = None
    for step in range(iterations):
        similarity = X @ centroids.T  # (N, E)
        if assign is not None:
            new_labels = assign(similarity, capacities)
        else:
            logits = similarity / (SINKHORN_TEMPERATURE * float(similarity.std()) + _TINY_SPREAD)
            rounds = SINKHORN_ITERATIONS if step == 0 else SINKHORN_WARM_ITERATIONS
            row, col = _sinkhorn_balance(logits, capacities, col, rounds)
            # Exact sizes at every step: balance is what splits two merged clusters apart.
            new_labels = balanced_assign(logits + row[:, None] + col, capacities)
        changed = N if labels is None else int((new_labels != labels).sum())
        labels = new_labels
        if changed <= KMEANS_TOLERANCE * N:
            break
        centroids = torch.zeros_like(centroids).index_add_(0, labels, X)
        centroids = Fn.normalize(centroids, dim=1)
    assert labels is not None
    return labels


# --------------------------------------------------------------------------- co-activation graph


def coactivation_affinity(coactivation: torch.Tensor) -> torch.Tensor:
    """Normalised co-activation: ``C_ij / sqrt(C_ii C_jj)`` with a zero diagonal.

    Raw counts favour neurons that fire often; normalising makes the affinity of two neurons
    the cosine of their activity patterns, in [0, 1].

    Args:
        coactivation: (F, F) counts of tokens on which both neurons were active.

    Returns:
        (F, F) float32 affinity.
    """
    counts = coactivation.detach().float()
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise MoefyError(f"co-activation must be a square (F, F) matrix, got {tuple(counts.shape)}")
    scale = counts.diagonal().clamp_min(1.0).rsqrt()  # (F,)
    affinity = counts * scale[:, None] * scale[None, :]
    affinity.fill_diagonal_(0.0)
    return affinity.clamp_min_(0.0)


def _knn_graph(affinity: torch.Tensor, neighbors: int) -> tuple[torch.Tensor, ...]:
    """Symmetric k-nearest-neighbour graph in CSR: (row starts, columns, integer weights)."""
    F = affinity.shape[0]
    k = max(1, min(neighbors, F - 1))
    values, columns = affinity.topk(k, dim=1)  # (F, k)
    rows = torch.arange(F).repeat_interleave(k)
    values, columns = values.reshape(-1), columns.reshape(-1)
    keep = values > 0
    rows, columns, values = rows[keep], columns[keep], values[keep]
    # Both directions; a mutual pair sums its weights, which is still symmetric.
    sources, targets = torch.cat([rows, columns]), torch.cat([columns, rows])
    keys, inverse = torch.unique(sources * F + targets, sorted=True, return_inverse=True)
    weights = torch.zeros(keys.numel()).index_add_(0, inverse, torch.cat([values, values]))
    starts = torch.zeros(F + 1, dtype=torch.long)
    starts[1:] = torch.cumsum(torch.bincount(keys // F, minlength=F), 0)
    weights = (weights / weights.max().clamp_min(_TINY_SPREAD) * EDGE_WEIGHT_SCALE).round()
    return starts, keys % F, weights.clamp_min(1).long()


def _metis_parts(affinity: torch.Tensor, num_parts: int, seed: int) -> torch.Tensor | None:
    """Nearly balanced METIS partition of the co-activation graph; None without pymetis."""
    try:
        import pymetis
    except ImportError:
        return None
    starts, columns, weights = _knn_graph(affinity, EDGE_BUDGET // affinity.shape[0])
    if columns.numel() == 0:
        return None
    options = pymetis.Options(seed=seed, ufactor=METIS_UFACTOR)
    adjacency = pymetis.CSRAdjacency(starts.numpy(), columns.numpy())
    result = pymetis.part_graph(num_parts, adjacency, eweights=weights.numpy(), options=options)
    return torch.tensor(list(result.vertex_part), dtype=torch.long)


def rebalance(
    labels: torch.Tensor, affinity: torch.Tensor, capacities: torch.Tensor
) -> torch.Tensor:
    """Make a nearly balanced partition exactly balanced, moving as few neurons as possible.

    Parts are matched to capacities by size; each overfull part gives up the members with the
    lowest mean affinity to it, and those go, greedily by mean affinity, to parts with room.

    Args:
        labels: (F,) part of each neuron, any sizes.
        affinity: (F, F) neuron affinity.
        capacities: (E,) exact target sizes.

    Returns:
        (F,) int64 labels with ``bincount == capacities``.
    """
    E = capacities.numel()
    labels = labels.long().clone()
    sizes = torch.bincount(labels, minlength=E)
    mapping = torch.empty(E, dtype=torch.long)
    mapping[torch.argsort(sizes, descending=True, stable=True)] = torch.argsort(
        capacities, descending=True, stable=True
    )
    labels = mapping[labels]
    sizes = torch.bincount(labels, minlength=E)
    if torch.equal(sizes, capacities):
        return labels
    membership = Fn.one_hot(labels, E).to(affinity.dtype)  # (F, E)
    mean_affinity = (affinity @ membership) / sizes.clamp_min(1).to(affinity.dtype)  # (F, E)
    moved: list[torch.Tensor] = []
    for expert in torch.nonzero(sizes > capacities).flatten().tolist():
        members = torch.nonzero(labels == expert).flatten()
        excess = int(sizes[expert] - capacities[expert])
        weakest = members[torch.argsort(mean_affinity[members, expert])[:excess]]
        moved.append(weakest)
    moved_index = torch.cat(moved)
    labels[moved_index] = -1
    room = capacities - torch.bincount(labels[labels >= 0], minlength=E)
    labels[moved_index] = balanced_assign(mean_affinity[moved_index], room)
    return labels


def coactivation_partition(
    coactivation: torch.Tensor, capacities: torch.Tensor, *, seed: int = 0
) -> torch.Tensor:
    """Balanced partition of the co-activation graph into experts of the given sizes.

    Uses METIS (pymetis) on the graph of the normalised co-activation (see
    :func:`coactivation_affinity`): complete up to ``EDGE_BUDGET`` edges, else each neuron's
    strongest neighbours, symmetrised; then :func:`rebalance` for exact sizes.
    Without pymetis it falls back to :func:`balanced_kmeans` on the affinity rows (neurons with
    similar co-activation patterns go together). The partition runs on the CPU: METIS is a CPU
    library and the counts come from a profile on disk.

    Args:
        coactivation: (F, F) co-activation counts.
        capacities: (E,) exact expert sizes, summing to F.
        seed: METIS / k-means seed.

    Returns:
        (F,) int64 expert of each neuron.
    """
    affinity = coactivation_affinity(coactivation.cpu())
    capacities = capacities.long().cpu()
    if int(capacities.sum()) != affinity.shape[0]:
        raise MoefyError(
            f"capacities sum to {int(capacities.sum())}, co-activation has {affinity.shape[0]} rows"
        )
    if capacities.numel() == 1:
        return torch.zeros(affinity.shape[0], dtype=torch.long)
    parts = _metis_parts(affinity, capacities.numel(), seed)
    if parts is None:
        return balanced_kmeans(affinity, capacities, seed=seed)
    return rebalance(parts, affinity, capacities)


def random_partition(capacities: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """A seeded random partition of ``capacities.sum()`` neurons into experts of given sizes.

    Args:
        capacities: (E,) expert sizes.
        seed: seed of the permutation.

    Returns:
        (F,) int64 expert of each neuron.
    """
    capacities = capacities.long()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(int(capacities.sum()), generator=generator)
    labels = torch.empty_like(order)
    labels[order] = torch.repeat_interleave(torch.arange(capacities.numel()), capacities)
    return labels


def input_features(weights: FFNWeights) -> torch.Tensor:
    """(F, K) features of each neuron for parameter clustering.

    The L2-normalised input-weight row; for gated FFNs the normalised gate and up rows side by
    side (K = 2D), so a neuron's whole input path decides its expert.
    """
    parts = [weights.w_up] if weights.w_gate is None else [weights.w_gate, weights.w_up]
    return torch.cat([Fn.normalize(p.detach().float(), dim=1) for p in parts], dim=1)


@register_split_method("random", help="a seeded random partition (the baseline)")
def _split_random(request: SplitRequest) -> torch.Tensor:
    return random_partition(request.capacities, seed=request.seed)


@register_split_method(
    "params", help="balanced k-means on the normalised input-weight rows (no data needed)"
)
def _split_params(request: SplitRequest) -> torch.Tensor:
    return balanced_kmeans(input_features(request.weights), request.capacities, seed=request.seed)


@register_split_method(
    "coactivation",
    needs_coactivation=True,
    help="balanced partition of the co-activation graph of a profile",
)
def _split_coactivation(request: SplitRequest) -> torch.Tensor:
    assert request.coactivation is not None
    F = request.layout.d_ff
    if tuple(request.coactivation.shape) != (F, F):
        raise MoefyError(
            f"co-activation matrix is {tuple(request.coactivation.shape)}, the layer has d_ff={F}"
        )
    return coactivation_partition(request.coactivation, request.capacities, seed=request.seed)
