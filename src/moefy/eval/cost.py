"""FLOPs actually spent per token, measured from what ran: dense, moefied, sparsified or dropped.

Counting convention (the one :mod:`moefy.moe.flops` uses, so all methods compare):
    - a linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) costs ``2 * I * O`` per row, ``+ O``
      with a bias;
    - an FFN activation costs one FLOP per neuron, and the gating product ``act(g) * u`` one more;
    - a module moefy swapped in reports its own FLOPs through the cost protocol of
      :mod:`moefy.cost` (a MoE layer from its selection tally, selected experts + router; a
      sparse wrapper the dense count of the layer it wraps less 2 FLOPs per skipped weight; a
      dropped layer nothing), counted as FFN or other by where it sits.
    Attention score products (``QK^T``, ``AV``) depend on the context length and are not counted;
    neither are norms, embeddings and residual additions.

``weight_bytes_per_token`` is the weight memory a batch-1 step reads: each multiply-add reads one
weight, so it is ``FLOPs / 2 * bytes per weight`` over the counted layers.

Shape legend:
    N: rows (tokens) through a layer, I: input features, O: output features
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from moefy.cost import FLOPS_PER_MULTIPLY_ADD, MeasuredModule, swapped_modules

FFN, OTHER, ATTENTION = "ffn", "other", "attention"


@dataclass(frozen=True)
class Cost:
    """FLOPs and weight bytes per token of one evaluation.

    Attributes:
        ffn_flops_per_token: FFN FLOPs spent per token, all layers.
        other_flops_per_token: FLOPs of the other linear layers (attention projections, heads).
        weight_bytes_per_token: weight bytes read per token at batch 1 (see module docstring).
        tokens: tokens the figures are averaged over.
        attention_flops_per_token: the part of ``other_flops_per_token`` spent inside the
            transformer blocks (the attention projections), so that FFN plus attention are the
            blocks' linear FLOPs (the embedding and the LM head left out).
    """

    ffn_flops_per_token: float
    other_flops_per_token: float
    weight_bytes_per_token: float
    tokens: int
    attention_flops_per_token: float = 0.0

    @property
    def block_linear_flops_per_token(self) -> float:
        """Linear-layer FLOPs inside the transformer blocks: FFN plus attention projections."""
        return self.ffn_flops_per_token + self.attention_flops_per_token

    @property
    def total_flops_per_token(self) -> float:
        """FFN plus other linear-layer FLOPs per token."""
        return self.ffn_flops_per_token + self.other_flops_per_token

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, including the total."""
        return {**asdict(self), "total_flops_per_token": self.total_flops_per_token}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None
    )


def _linear_flops(module: nn.Module, rows: int) -> float:
    """FLOPs of ``rows`` rows through a Linear or Conv1D."""
    weight = module.weight
    in_f, out_f = (
        (weight.shape[1], weight.shape[0])
        if isinstance(module, nn.Linear)
        else (weight.shape[0], weight.shape[1])
    )
    bias = out_f if getattr(module, "bias", None) is not None else 0
    return float(rows * (FLOPS_PER_MULTIPLY_ADD * in_f * out_f + bias))


def block_paths(model: nn.Module) -> set[str]:
    """Dotted paths of the transformer blocks of ``model`` (empty for an unregistered
    architecture)."""
    from moefy.arch.registry import _resolve_stack, get_spec
    from moefy.errors import MoefyError

    try:
        spec = get_spec(model)
    except MoefyError:
        return set()
    paths: set[str] = set()
    for blocks_path, _ in spec.stacks:
        resolved = _resolve_stack(model, blocks_path)
        if resolved is not None:
            full, blocks = resolved
            paths.update(f"{full}.{i}" for i in range(len(blocks)))
    return paths


def ffn_part_paths(model: nn.Module) -> tuple[set[str], dict[str, bool]]:
    """Dotted paths of FFN modules and of FFN activations of ``model``.

    Returns:
        ``(prefixes, activations)``: every module whose path equals or starts with a prefix
        belongs to an FFN; ``activations`` maps each FFN activation path to whether its FFN is
        gated. Empty when the architecture is not registered (everything then counts as other).
    """
    from moefy.arch.registry import _resolve_stack, get_spec
    from moefy.errors import MoefyError

    try:
        spec = get_spec(model)
    except MoefyError:
        return set(), {}
    prefixes: set[str] = set()
    activations: dict[str, bool] = {}
    for blocks_path, ffn_path in spec.stacks:
        resolved = _resolve_stack(model, blocks_path)
        if resolved is None:
            continue
        full, blocks = resolved
        for i in range(len(blocks)):
            block = f"{full}.{i}"
            ffn = f"{block}.{ffn_path}" if ffn_path else block
            parts = [spec.up, spec.down] + ([spec.gate] if spec.gate else [])
            if spec.inline:
                prefixes.update(f"{ffn}.{p}" for p in parts)
            else:
                prefixes.add(ffn)
            activations[f"{ffn}.{spec.act}"] = spec.gated
    return prefixes, activations


def _in_ffn(path: str, prefixes: set[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _held_by(path: str, roots: Iterable[str]) -> bool:
    """True when module ``path`` is one of ``roots`` or inside one ("" is the whole model)."""
    return any(root == "" or path == root or path.startswith(root + ".") for root in roots)


class CostMeter:
    """Counts FLOPs per category while a model runs; use :func:`measure_cost`.

    Attributes:
        flops: ``{"ffn": float, "other": float}`` FLOPs of the plain layers counted so far (the
            swapped modules' own figures are added by :meth:`result`).
        tokens: tokens added with :meth:`add_tokens`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flops = {FFN: 0.0, OTHER: 0.0, ATTENTION: 0.0}
        self.tokens = 0
        self._handles: list[RemovableHandle] = []
        self._swapped: list[tuple[MeasuredModule, tuple[str, ...]]] = []  # (module, categories)
        parameter = next(model.parameters(), None)
        self.bytes_per_weight = parameter.element_size() if parameter is not None else 4

    def add_tokens(self, n: int) -> None:
        """Add ``n`` tokens to the per-token denominator."""
        self.tokens += int(n)

    def _hook(self, module: nn.Module, categories: tuple[str, ...], count) -> None:
        def hook(_mod: nn.Module, _args: Any, output: Any) -> None:
            flops = count(output)
            for category in categories:
                self.flops[category] += flops

        self._handles.append(module.register_forward_hook(hook))

    def attach(self) -> None:
        """Register the hooks and reset the counters of the swapped modules."""
        prefixes, activations = ffn_part_paths(self.model)
        blocks = block_paths(self.model)

        def categories(path: str) -> tuple[str, ...]:
            if _in_ffn(path, prefixes):
                return (FFN,)
            return (OTHER, ATTENTION) if _in_ffn(path, blocks) else (OTHER,)

        swapped = dict(swapped_modules(self.model))
        for path, module in swapped.items():
            module.reset_counters()
            self._swapped.append((module, categories(path)))
        for path, module in self.model.named_modules():
            if _held_by(path, swapped):
                continue  # counted by the swapped module that holds it
            category = categories(path)
            if _is_linear(module):
                self._hook(module, category, _rows_counter(module))
            elif path in activations:
                self._hook(module, category, _activation_counter(activations[path]))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def result(self) -> Cost:
        """The per-token cost of what ran since :meth:`attach`."""
        from moefy.errors import MoefyError

        if self.tokens <= 0:
            raise MoefyError("no tokens were counted: run the model inside measure_cost first")
        flops = dict(self.flops)
        for module, categories in self._swapped:
            spent = module.measured_cost().flops
            for category in categories:
                flops[category] += spent
        total = flops[FFN] + flops[OTHER]
        return Cost(
            ffn_flops_per_token=flops[FFN] / self.tokens,
            other_flops_per_token=flops[OTHER] / self.tokens,
            attention_flops_per_token=flops[ATTENTION] / self.tokens,
            weight_bytes_per_token=total
            / FLOPS_PER_MULTIPLY_ADD
            * self.bytes_per_weight
            / self.tokens,
            tokens=self.tokens,
        )


def _rows_counter(linear: nn.Module):
    weight = linear.weight
    out_features = weight.shape[0] if isinstance(linear, nn.Linear) else weight.shape[1]

    def count(output: torch.Tensor) -> float:  # output (..., O)
        return _linear_flops(linear, output.numel() // out_features)

    return count


def _activation_counter(gated: bool):
    per_neuron = 2 if gated else 1  # the activation, and the gating product when gated

    def count(output: torch.Tensor) -> float:
        return float(output.numel() * per_neuron)

    return count


@contextmanager
def measure_cost(model: nn.Module) -> Iterator[CostMeter]:
    """Count the FLOPs ``model`` spends inside the block; hooks are removed on exit.

    Args:
        model: any supported model: dense, moefied, sparsified, with layers dropped.

    Yields:
        A :class:`CostMeter`; call ``add_tokens(n)`` for the tokens fed and ``result()`` after.

    Example:
        >>> with measure_cost(model) as meter:
        ...     model(input_ids); meter.add_tokens(input_ids.numel())
        >>> meter.result().ffn_flops_per_token
    """
    meter = CostMeter(model)
    meter.attach()
    try:
        yield meter
    finally:
        meter.detach()
