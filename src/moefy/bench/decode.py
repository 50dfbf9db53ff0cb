"""Decode speed of whole models: tokens per second through transformers' ``generate``, and the
bytes of weights each generated token reads (what bounds decode on a CPU).

Decode time per token is ``(T(n) - T(1)) / (n - 1)`` with ``T(n)`` the median time of a greedy
``generate`` of exactly ``n`` new tokens: the prompt's prefill cancels out. All models are timed
round-robin in the same rounds, through transformers' ``generate`` or, compiled, through
:class:`moefy.decoding.StaticDecoder` (static cache, ``torch.compile``d step; each model
compiles in the untimed warm-up round). The compiled steps decode as a deployment would, without
the sparse wrappers' zero counting (``count=False``); the shares each token reads are counted in
one more decode per model, by the decoder's eager twin (the same tokens).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from moefy.bench.timing import interleaved_medians
from moefy.cost import reset_counters, swapped_modules, tensor_bytes
from moefy.errors import MoefyError


@dataclass(frozen=True)
class DecodeSpeed:
    """Decode speed of one model variant.

    Attributes:
        seconds_per_token: median decode seconds per new token (prefill excluded).
        bytes_per_token: weight bytes one decoded token reads (measured active shares).
    """

    seconds_per_token: float
    bytes_per_token: float

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds_per_token


def generate_exactly(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (end-of-text is not allowed to stop it).

    Args:
        model: a causal LM.
        input_ids: (B, T) prompt.
        new_tokens: tokens to add.

    Returns:
        (B, T + new_tokens) token ids.
    """
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.pad_token_id or 0,
        eos_token_id=None,
    )
    with torch.inference_mode():
        return model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )


def decode_speeds(
    models: Mapping[str, nn.Module],
    input_ids: torch.Tensor,
    new_tokens: int,
    *,
    rounds: int,
    before: Mapping[str, Callable[[], None]] | None = None,
    compiled: bool = False,
) -> dict[str, DecodeSpeed]:
    """Decode speed of each model, all timed in the same rounds.

    Args:
        models: name -> causal LM (several names may share a model, with different ``before``).
        input_ids: (1, T) prompt.
        new_tokens: tokens per timed generate, at least 2.
        rounds: timed generates per model and length.
        before: name -> a call run before each of that name's generates (e.g. set a top-k).
        compiled: decode with a :class:`~moefy.decoding.StaticDecoder` per name (static cache,
            compiled step) instead of ``generate``.

    Returns:
        name -> :class:`DecodeSpeed`.

    Raises:
        MoefyError: fewer than 2 new tokens.
    """
    if new_tokens < 2:
        raise MoefyError(f"decode timing needs at least 2 new tokens, got {new_tokens}")
    before = before or {}
    decode = {
        name: _decoder(model, input_ids, new_tokens, compiled) for name, model in models.items()
    }

    def call(name: str, decoder: Callable[[int], torch.Tensor], n: int) -> Callable[[], object]:
        def run() -> object:
            if name in before:
                before[name]()
            return decoder(n)

        return run

    variants = {}
    for name in models:
        variants[f"{name}|1"] = call(name, decode[name], 1)
        variants[f"{name}|n"] = call(name, decode[name], new_tokens)
    medians = interleaved_medians(variants, rounds=rounds)
    speeds = {}
    for name, model in models.items():
        # One more generate, alone, measures the shares this variant reads (models may be shared);
        # compiled, by the static decoder's eager twin (same tokens), made only now: the timed
        # steps leave the counters out, as a deployment would.
        reset_counters(model)
        counting = _decoder(model, input_ids, new_tokens, compiled, counting=True)
        call(name, counting, new_tokens)()
        seconds = (medians[f"{name}|n"] - medians[f"{name}|1"]) / (new_tokens - 1)
        speeds[name] = DecodeSpeed(max(seconds, 1e-9), weight_bytes_per_token(model))
    return speeds


def speed_rows(
    speeds: Mapping[str, DecodeSpeed], *, threads: int, step: str
) -> list[dict[str, object]]:
    """Table rows of :func:`decode_speeds`' results, against the ``dense`` entry.

    Names are ``variant`` or ``variant@active`` (the share of weights or experts it keeps).
    Each row: ``threads``, ``step`` (``generate`` or ``compiled``), ``variant``, ``active``,
    ``tokens_per_s``, ``ms_per_token``, ``speedup`` (dense time over its time, same rounds),
    ``mb_per_token`` and ``limit_speedup`` (dense bytes over its bytes per token).
    """
    dense = speeds["dense"]
    rows = []
    for name, speed in speeds.items():
        variant, _, active = name.partition("@")
        rows.append(
            {
                "threads": threads,
                "step": step,
                "variant": variant,
                "active": float(active) if active else 1.0,
                "tokens_per_s": speed.tokens_per_second,
                "ms_per_token": speed.seconds_per_token * 1e3,
                "speedup": dense.seconds_per_token / speed.seconds_per_token,
                "mb_per_token": speed.bytes_per_token / 1e6,
                "limit_speedup": dense.bytes_per_token / speed.bytes_per_token,
            }
        )
    return rows


def _decoder(
    model: nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int,
    compiled: bool,
    *,
    counting: bool = False,
) -> Callable[[int], torch.Tensor]:
    """``n -> (1, T + n)`` greedy tokens of ``model`` through generate or a static decoder
    (compiled and not counting; ``counting``: its eager twin, whose wrappers count)."""
    if not compiled:
        return lambda n: generate_exactly(model, input_ids, n)
    from moefy.decoding import StaticDecoder

    length = input_ids.shape[1] + new_tokens
    decoder = StaticDecoder(model, max_length=length, compile=not counting, count=counting)
    return lambda n: decoder.generate(input_ids, n)


def weight_bytes_per_token(model: nn.Module) -> float:
    """Bytes of weights one decoded token reads, from the shares measured since the last reset.

    Each module moefy swapped in says what it reads (cost protocol of :mod:`moefy.cost`): MoE
    layers their selected experts (measured active fraction) and their selector, sparse linear
    wrappers the rows of kept inputs (measured zero share), dropped layers nothing. An
    embedding reads one row; every other parameter is read whole. The KV cache is left out
    (small at the short contexts benchmarked).

    Args:
        model: any model, after the decoding whose shares should count.

    Returns:
        Bytes per token.

    Example:
        >>> reset_counters(model); generate_exactly(model, prompt, 32)
        >>> weight_bytes_per_token(model) / 1e6  # MB per token
    """
    total = 0.0
    skip: set[int] = set()
    swapped = {id(module): module for _, module in swapped_modules(model)}
    for module in model.modules():
        if id(module) in skip:
            continue
        if id(module) in swapped:
            skip.update(id(m) for m in module.modules())
            total += module.measured_cost().weight_bytes
        elif isinstance(module, nn.Embedding):
            total += module.weight.shape[1] * module.weight.element_size()
        else:
            total += tensor_bytes(module.parameters(recurse=False))
    return total


def dense_copy(model: nn.Module) -> nn.Module:
    """A dense copy of a moefied or sparsified model (the model itself is left as it is)."""
    from moefy.moe import moe_layers, unmoefy
    from moefy.sparsify.wrappers import sparse_modules, unsparsify

    dense = copy.deepcopy(model)
    if moe_layers(dense):
        unmoefy(dense)
    if next(sparse_modules(dense), None) is not None:
        unsparsify(dense)
    return dense.eval()
