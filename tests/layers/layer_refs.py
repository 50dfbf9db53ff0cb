"""Shared helpers for the layer-redundancy tests: reference models built with zeroing hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from moefy.arch import find_ffns
from moefy.arch.spec import get_submodule
from moefy.layers import find_layers

# One tolerance table per dtype for "equals the reference model" checks.
TOLERANCE = {torch.float32: {"atol": 2e-5, "rtol": 1e-4}}


def _zero_first_output(_module: nn.Module, _args: tuple, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])
    return torch.zeros_like(output)


@contextlib.contextmanager
def zeroed(
    model: nn.Module, attention: tuple[int, ...] = (), mlp: tuple[int, ...] = ()
) -> Iterator[nn.Module]:
    """The dense ``model`` with the outputs of the named attention sublayers and MLPs zeroed.

    The hand-made reference for a drop: the zeroed parts still run (and the attention still
    fills its KV cache), so positions come from the untouched cache.
    """
    sites = find_layers(model)
    ffns = find_ffns(model)
    handles = []
    try:
        for index in attention:
            site = sites[index]
            module = get_submodule(site.block, site.attention_out_path)
            handles.append(module.register_forward_hook(_zero_first_output))
        for index in mlp:
            handles.append(ffns[index].part("down").register_forward_hook(_zero_first_output))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


LEFT_PADDING = 3


def greedy(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 4, **generate_kwargs):
    """Greedy generation with the KV cache: (token ids, stacked per-step logits).

    ``generate_kwargs`` go to ``generate`` (e.g. ``cache_implementation="static"``).

    Row 0 is left-padded, so every step builds an explicit attention mask from the cache's
    mask sizes (an all-ones mask lets transformers skip the mask and hide a wrong cache length).
    """
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :LEFT_PADDING] = 0
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
            **generate_kwargs,
        )
    return out.sequences, torch.stack(out.logits, dim=1)
