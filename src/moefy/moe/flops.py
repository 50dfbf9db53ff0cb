"""FFN FLOPs per token: the counting convention every moefy report uses.

A multiply-add counts as 2 FLOPs, so a (1, D) x (D, n) product costs ``2 * D * n``. Per token,
an FFN running ``n`` neurons costs

    2 * D * n * P           projections: P = 3 if gated (gate, up, down) else 2 (up, down)
  + n * B                   input biases: B = number of input projections with a bias (0-2)
  + n                       activation function (one op per neuron, whatever the function)
  + n                       gating product act(g) * u, gated FFNs only
  + D                       output bias, if any

Summing the outputs of several experts is part of the down projection's multiply-adds (a
length-n dot product counts 2n), so it adds nothing. A dense FFN is the case n = d_ff. The
selection's own cost (a router) is reported separately by the selector; the oracle's is not
counted because it is an analysis tool.
"""

from __future__ import annotations

from moefy.cost import FLOPS_PER_MULTIPLY_ADD
from moefy.errors import MoefyError

__all__ = ["FLOPS_PER_MULTIPLY_ADD", "ffn_flops_per_token"]


def ffn_flops_per_token(
    d_model: int,
    neurons: float,
    *,
    gated: bool,
    in_biases: int = 0,
    out_bias: bool = False,
) -> float:
    """FLOPs per token of an FFN that runs ``neurons`` neurons (see the module docstring).

    Args:
        d_model: model width D.
        neurons: neurons computed per token: d_ff for the dense FFN, or (mean experts run per
            token) x (expert size) for a MoE; may be fractional (a mean).
        gated: gated FFN (gate, up and down projections).
        in_biases: how many input projections carry a bias (0, 1, or 2 for gate and up).
        out_bias: the down projection has a bias.

    Returns:
        FLOPs per token.

    Example:
        >>> ffn_flops_per_token(4096, 11008, gated=True)  # LLaMA-7B FFN: 2*4096*11008*3 + 2*11008
        270554624.0
    """
    if d_model < 1 or neurons < 0:
        raise MoefyError(f"need d_model >= 1 and neurons >= 0, got {d_model}, {neurons}")
    projections = 3 if gated else 2
    max_biases = 2 if gated else 1
    if not 0 <= in_biases <= max_biases:
        raise MoefyError(f"in_biases must be in [0, {max_biases}], got {in_biases}")
    per_neuron = FLOPS_PER_MULTIPLY_ADD * d_model * projections + in_biases + 1 + int(gated)
    return float(neurons * per_neuron + (d_model if out_bias else 0))
