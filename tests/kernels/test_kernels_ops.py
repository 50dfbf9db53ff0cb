"""Each kernel against its reference twin and a naive per-token loop, on many shapes."""

from __future__ import annotations

import pytest
import torch

from moefy.kernels import SMALL_BATCH_MAX, expert_ffn, threshold_linear
from moefy.kernels.activations import ACTIVATIONS, apply_activation

BACKENDS = ("reference", "cpu", "auto")

# (N, D, E, S, gated): odd widths, one slot, one expert, batch 1..16
EXPERT_SHAPES = [
    (1, 64, 8, 16, True),
    (1, 13, 4, 3, True),
    (2, 37, 5, 1, False),
    (3, 8, 1, 7, True),
    (5, 100, 6, 9, False),
    (8, 24, 16, 4, True),
    (9, 7, 3, 2, True),
    (SMALL_BATCH_MAX, 72, 12, 5, True),
    (SMALL_BATCH_MAX, 1, 2, 1, False),
]


def _naive_expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated):
    """One token, one expert at a time: the definition written out."""
    S = w_out.shape[1]
    out = torch.zeros_like(x) if b_out is None else b_out.expand_as(x).clone()
    for t in range(x.shape[0]):
        for e in mask[t].nonzero().flatten().tolist():
            pre = w_in[e] @ x[t] + (0 if b_in is None else b_in[e])  # (S_in,)
            h = apply_activation(pre[:S], act) * pre[S:] if gated else apply_activation(pre, act)
            out[t] += h @ w_out[e]
    return out


def _expert_case(N, D, E, S, gated, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S_in = 2 * S if gated else S
    x = torch.randn(N, D, generator=gen)
    w_in = torch.randn(E, S_in, D, generator=gen) / D**0.5
    w_out = torch.randn(E, S, D, generator=gen) / S**0.5
    b_in = torch.randn(E, S_in, generator=gen) if bias else None
    b_out = torch.randn(D, generator=gen) if bias else None
    mask = torch.rand(N, E, generator=gen) < 0.4
    return x, mask, w_in, w_out, b_in, b_out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", EXPERT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_expert_ffn_matches_naive_loop(shape, act, backend, fp32):
    N, D, E, S, gated = shape
    for bias in (False, True):
        x, mask, w_in, w_out, b_in, b_out = _expert_case(N, D, E, S, gated, bias)
        expected = _naive_expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated)
        got = expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated, backend=backend)
        assert got.shape == (N, D) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, **fp32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("selected", ["none", "all", "one-token", "one-expert"])
def test_expert_ffn_edge_selections(selected, backend, fp32):
    x, _, w_in, w_out, b_in, b_out = _expert_case(6, 21, 5, 3, True, bias=True, seed=1)
    mask = torch.zeros(6, 5, dtype=torch.bool)
    if selected == "all":
        mask[:] = True
    elif selected == "one-token":
        mask[2] = True
    elif selected == "one-expert":
        mask[:, 4] = True
    expected = _naive_expert_ffn(x, mask, w_in, w_out, b_in, b_out, "silu", True)
    got = expert_ffn(x, mask, w_in, w_out, b_in, b_out, "silu", True, backend=backend)
    torch.testing.assert_close(got, expected, **fp32)
    if selected == "none":  # nothing selected: only the down bias
        torch.testing.assert_close(got, b_out.expand_as(got), rtol=0, atol=0)


def test_expert_ffn_reads_only_selected_experts():
    """Poison the unselected experts' weights: a kernel that reads them returns NaN."""
    x, mask, w_in, w_out, _, _ = _expert_case(4, 40, 6, 5, True, bias=False, seed=2)
    mask[:, 3] = False
    w_in[3], w_out[3] = float("nan"), float("nan")
    got = expert_ffn(x, mask, w_in, w_out, None, None, "gelu_tanh", True, backend="cpu")
    assert torch.isfinite(got).all()


def test_expert_ffn_accepts_integer_style_mask(fp32):
    x, mask, w_in, w_out, _, _ = _expert_case(3, 16, 4, 2, True, bias=False, seed=3)
    expected = expert_ffn(x, mask, w_in, w_out, None, None, "silu", True, backend="reference")
    got = expert_ffn(x, mask.to(torch.uint8), w_in, w_out, None, None, "silu", True, backend="cpu")
    torch.testing.assert_close(got, expected, **fp32)


def _naive_threshold_linear(x, weight_t, bias, threshold):
    thresholds = threshold.expand(x.shape[-1])
    out = torch.zeros(x.shape[0], weight_t.shape[1])
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            if not x[t, i].abs() <= thresholds[i]:
                out[t] += x[t, i] * weight_t[i]
    return out if bias is None else out + bias


# (N, I, O)
LINEAR_SHAPES = [(1, 64, 32), (1, 13, 1), (2, 9, 21), (7, 40, 3), (SMALL_BATCH_MAX, 33, 17)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_threshold_linear_matches_naive_loop(shape, per_channel, backend, fp32):
    N, n_in, n_out = shape
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(N, n_in, generator=gen)
    x[0, 0] = 0.0  # an exact zero is dropped even at threshold zero
    weight_t = torch.randn(n_in, n_out, generator=gen)
    bias = torch.randn(n_out, generator=gen)
    threshold = torch.rand(n_in, generator=gen) if per_channel else torch.tensor(0.6)
    dropped = int((x.abs() <= threshold).sum())
    for b in (None, bias):
        expected = _naive_threshold_linear(x, weight_t, b, threshold)
        zeros = torch.tensor(5, dtype=torch.int64)
        got = threshold_linear(x, weight_t, b, threshold, zeros, backend=backend)
        assert got.shape == (N, n_out)
        torch.testing.assert_close(got, expected, **fp32)
        assert int(zeros) == 5 + dropped  # added to what the counter held


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_linear_extremes(backend, fp32):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 19, generator=gen)
    weight_t, bias = torch.randn(19, 6, generator=gen), torch.randn(6, generator=gen)
    dropped = threshold_linear(x, weight_t, bias, torch.tensor(1e9), backend=backend)
    torch.testing.assert_close(dropped, bias.expand(3, 6), rtol=0, atol=0)
    kept = threshold_linear(x, weight_t, None, torch.tensor(0.0), backend=backend)
    torch.testing.assert_close(kept, x @ weight_t, **fp32)


def test_threshold_linear_skips_dropped_rows():
    """Poison the rows of dropped inputs: a kernel that reads them returns NaN."""
    x = torch.tensor([[0.05, 2.0, -0.01, -3.0, 0.0]])
    weight_t = torch.randn(5, 11)
    weight_t[[0, 2, 4]] = float("nan")
    got = threshold_linear(x, weight_t, None, torch.tensor(0.1), backend="cpu")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, 2.0 * weight_t[1:2] - 3.0 * weight_t[3:4])


# Routers as linear stacks: (layers' (out, in) widths, biases) for D -> E.
ROUTER_STACKS = {
    "centroid": lambda D, E: [(E, D, False)],
    "linear": lambda D, E: [(E, D, True)],
    "mlp": lambda D, E: [(11, D, True), (E, 11, True)],
}


def _router(kind, D, E, gen):
    return [
        (torch.randn(o, i, generator=gen), torch.randn(o, generator=gen) if bias else None)
        for o, i, bias in ROUTER_STACKS[kind](D, E)
    ]


def _naive_top_k(logits, k):
    """Per token: sort (value descending, index ascending), keep the first k."""
    mask = torch.zeros(logits.shape, dtype=torch.bool)
    for t, row in enumerate(logits.tolist()):
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        mask[t, order[:k]] = True
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(ROUTER_STACKS))
@pytest.mark.parametrize("shape", EXPERT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_routed_expert_ffn_is_router_top_k_then_experts(shape, kind, backend, fp32):
    from moefy.kernels import routed_expert_ffn

    N, D, E, S, gated = shape
    gen = torch.Generator().manual_seed(N * 100 + D)
    x, _, w_in, w_out, b_in, b_out = _expert_case(N, D, E, S, gated, bias=True)
    layers = _router(kind, D, E, gen)
    h = x
    for i, (weight, bias) in enumerate(layers):
        h = (h.relu() if i else h) @ weight.t() + (0 if bias is None else bias)
    for k in sorted({1, (E + 1) // 2, E}):
        mask = _naive_top_k(h, k)
        counts = torch.full((E,), 3, dtype=torch.long)
        seen = torch.tensor(5)
        got = routed_expert_ffn(
            x, layers, k, counts, seen, w_in, w_out, b_in, b_out, "silu", gated, backend=backend
        )
        expected = _naive_expert_ffn(x, mask, w_in, w_out, b_in, b_out, "silu", gated)
        torch.testing.assert_close(got, expected, **fp32)
        assert torch.equal(counts, 3 + mask.sum(dim=0)) and int(seen) == 5 + N


@pytest.mark.parametrize("backend", BACKENDS)
def test_routed_top_k_breaks_ties_to_the_lower_expert_and_ranks_nan_first(backend):
    from moefy.kernels import routed_expert_ffn

    E, D = 6, 4
    x = torch.eye(D)[:3]  # token t's logits are the router weight's column t
    weight = torch.tensor(
        [
            [1.0, 0.0, 2.0, 0.0],
            [1.0, float("nan"), 2.0, 0.0],
            [1.0, 0.0, 2.0, 0.0],
            [0.5, 0.0, 2.0, 0.0],
            [1.0, 0.0, 2.0, 0.0],
            [0.0, 0.0, 2.0, 0.0],
        ]
    )  # (E, D)
    _, _, w_in, w_out, _, _ = _expert_case(3, D, E, 2, True, bias=False)
    counts = torch.zeros(E, dtype=torch.long)
    routed_expert_ffn(
        x, [(weight, None)], 2, counts, torch.tensor(0), w_in, w_out, None, None, "relu", True,
        backend=backend,
    )  # fmt: skip
    # token 0: ties among experts 0, 1, 2, 4 -> 0, 1; token 1: NaN at expert 1 first, then
    # the tie 0, 2, 3, 4, 5 -> 0; token 2: all tied -> 0, 1
    assert counts.tolist() == [3, 3, 0, 0, 0, 0]


@pytest.mark.parametrize("k", [0, 5, True])
def test_routed_expert_ffn_rejects_k_out_of_range(k):
    from moefy.errors import MoefyError
    from moefy.kernels import routed_expert_ffn

    x, _, w_in, w_out, _, _ = _expert_case(1, 8, 4, 2, True, bias=False)
    with pytest.raises(MoefyError, match="out of range"):
        routed_expert_ffn(
            x, [(torch.randn(4, 8), None)], k, torch.zeros(4, dtype=torch.long),
            torch.tensor(0), w_in, w_out, None, None, "silu", True,
        )  # fmt: skip


def test_operators_equal_the_bindings_and_compile_without_breaks(fp32):
    """The torch.ops.moefy operators (what compiled graphs call) give the C++ bindings' results
    and tallies, and a fullgraph compile of the public calls under cpu equals eager."""
    from moefy.kernels import routed_expert_ffn, use_backend
    from moefy.kernels.backend import cpu_extension

    extension = cpu_extension()
    gen = torch.Generator().manual_seed(7)
    x, _, w_in, w_out, b_in, b_out = _expert_case(3, 24, 6, 4, True, bias=True)
    centroids = torch.randn(6, 24, generator=gen)
    weight_t = torch.randn(24, 10, generator=gen)
    threshold = torch.tensor([0.5])

    def bindings(counts, seen, zeros):
        routed = extension.routed_expert_ffn(
            x, [centroids, torch.empty(0)], 2, counts, seen, w_in, w_out, b_in, b_out, 1, True
        )
        return routed, extension.threshold_linear(x, weight_t, None, threshold, zeros)

    def operators(counts, seen, zeros):
        routed = torch.ops.moefy.routed_expert_ffn(
            x, [centroids], [None], 2, counts, seen, w_in, w_out, b_in, b_out, "silu", True
        )
        return routed, torch.ops.moefy.threshold_linear(x, weight_t, None, threshold, zeros)

    tallies = [(torch.zeros(6, dtype=torch.long), torch.tensor(0), torch.tensor(0)) for _ in "ab"]
    expected, got = bindings(*tallies[0]), operators(*tallies[1])
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
    for e, g in zip(*tallies, strict=True):
        assert torch.equal(e, g)

    def entry_points(x, counts, seen, zeros):
        routed = routed_expert_ffn(
            x, [(centroids, None)], 2, counts, seen, w_in, w_out, b_in, b_out, "silu", True
        )
        return routed + 1, threshold_linear(x, weight_t, None, threshold, zeros)

    compiled_tallies = [torch.zeros(6, dtype=torch.long), torch.tensor(0), torch.tensor(0)]
    compiled = torch.compile(entry_points, fullgraph=True, backend="aot_eager")
    with use_backend("cpu"):
        got = compiled(x, *compiled_tallies)
    torch.testing.assert_close(got[0], expected[0] + 1, **fp32)
    torch.testing.assert_close(got[1], expected[1], **fp32)
    for e, g in zip(tallies[0], compiled_tallies, strict=True):
        assert torch.equal(e, g)  # the in-place tallies survive functionalisation
