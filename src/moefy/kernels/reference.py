"""Plain-torch twins of the kernels: the same signatures, the definition of the right answer.

Shape legend:
    N: tokens, D: model width, E: experts, S: slots per expert, S_in: input rows per expert
    (2S gated: gate rows then up rows; S otherwise), I: input features, O: output features
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as Fn

from moefy.kernels.activations import apply_activation


def expert_ffn(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    act: str,
    gated: bool,
) -> torch.Tensor:
    """The FFN output over each token's selected experts.

    Args:
        x: (N, D) tokens.
        mask: (N, E) bool, the experts each token runs.
        w_in: (E, S_in, D) input rows, expert-major (gate rows then up rows when gated).
        w_out: (E, S, D) the down projection transposed, expert-major.
        b_in: (E, S_in) input biases, or None.
        b_out: (D,) down bias, or None.
        act: an activation name of :data:`moefy.kernels.activations.ACTIVATIONS`.
        gated: ``act(gate) * up`` when True, ``act(up)`` otherwise.

    Returns:
        (N, D): ``b_out + sum over selected e of h_e @ w_out[e]``.

    Example:
        >>> y = expert_ffn(x, mask, moe.w_in, moe.w_out, moe.b_in, moe.b_out, "silu", True)
    """
    E, S_in, D = w_in.shape
    S = w_out.shape[1]
    pre = Fn.linear(x, w_in.reshape(E * S_in, D)).unflatten(-1, (E, S_in))  # (N, E, S_in)
    if b_in is not None:
        pre = pre + b_in
    if gated:
        gate, up = pre.split(S, dim=-1)
        hidden = apply_activation(gate, act) * up  # (N, E, S)
    else:
        hidden = apply_activation(pre, act)
    hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # unselected experts add nothing
    out = hidden.flatten(1) @ w_out.reshape(E * S, D)  # (N, D)
    return out if b_out is None else out + b_out


def threshold_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor,
    zeros_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer whose input entries with ``|x_i| <= threshold_i`` are dropped.

    Args:
        x: (N, I) inputs.
        weight_t: (I, O) the weight stored transposed, so a dropped input is one skipped row.
        bias: (O,) or None.
        threshold: () one threshold, or (I,) one per input channel.
        zeros_out: an int64 scalar tensor that gains the number of zero inputs after dropping
            (the rows a kernel skips), or None.

    Returns:
        (N, O).

    Example:
        >>> y = threshold_linear(x, linear.weight.t(), linear.bias, torch.tensor(0.1))
    """
    kept = x.masked_fill(x.abs() <= threshold, 0.0)  # (N, I)
    if zeros_out is not None:
        zeros_out += (kept == 0).sum()
    out = kept @ weight_t  # (N, O)
    return out if bias is None else out + bias


def threshold_gate_up(
    x: torch.Tensor,
    gate_t: torch.Tensor,
    up_t: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    threshold: torch.Tensor,
    zeros_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up projections of one input, its dropped entries skipped by both.

    Args:
        x: (N, I) inputs.
        gate_t: (I, F) the gate weight transposed.
        up_t: (I, F) the up weight transposed.
        gate_bias, up_bias: (F,) or None.
        threshold: () or (I,), shared by both projections.
        zeros_out: an int64 scalar tensor that gains the number of zero inputs after dropping
            (counted once), or None.

    Returns:
        (gate, up), each (N, F).

    Example:
        >>> gate, up = threshold_gate_up(x, gate_t, up_t, None, None, torch.tensor(0.1))
    """
    gate = threshold_linear(x, gate_t, gate_bias, threshold, zeros_out)
    return gate, threshold_linear(x, up_t, up_bias, threshold)


# A router as linear layers (weight (O, I), bias (O,) or None) with ReLU between them.
RouterLayers = Sequence[tuple[torch.Tensor, torch.Tensor | None]]


def router_logits(x: torch.Tensor, layers: RouterLayers) -> torch.Tensor:
    """(N, D) tokens -> (N, E): the router's last layer output (ReLU between layers).

    ``x`` is cast to the router's dtype (a bf16 model may carry an fp32 router).
    """
    h = x.to(layers[0][0].dtype)
    for i, (weight, bias) in enumerate(layers):
        h = Fn.linear(h.relu() if i else h, weight, bias)
    return h


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(N, E) -> (N, E) bool: each token's ``k`` largest entries (NaN first, ties to the lower
    index, as the C++ kernel breaks them)."""
    order = logits.sort(dim=-1, descending=True, stable=True).indices[:, :k]  # (N, k)
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    return mask.scatter_(1, order, True)


def route(
    x: torch.Tensor,
    layers: RouterLayers,
    k: int,
    counts: torch.Tensor,
    tokens_seen: torch.Tensor,
) -> torch.Tensor:
    """Each token's top-``k`` experts by the router's logits, tallied.

    Args:
        x: (N, D) tokens.
        layers: the router (see :data:`RouterLayers`); its output is (N, E).
        k: experts per token, 1..E.
        counts: (E,) int64, gains each expert's selections.
        tokens_seen: int64 scalar, gains N.

    Returns:
        (N, E) bool mask.
    """
    with torch.no_grad():
        mask = top_k_mask(router_logits(x, layers), k)
        counts += mask.sum(dim=0)
        tokens_seen += x.shape[0]
    return mask


def routed_expert_ffn(
    x: torch.Tensor,
    layers: RouterLayers,
    k: int,
    counts: torch.Tensor,
    tokens_seen: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    act: str,
    gated: bool,
) -> torch.Tensor:
    """:func:`route` then :func:`expert_ffn` over the chosen experts: (N, D) -> (N, D).

    Example:
        >>> layers = [(router.centroids, None)]
        >>> y = routed_expert_ffn(x, layers, 16, counts, seen, w_in, w_out, None, None, "silu",
        ...                       True)
    """
    mask = route(x, layers, k, counts, tokens_seen)  # (N, E)
    return expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated)
