"""Greedy decoding with a static KV cache and a compiled one-token step.

Shape legend:
    B: prompts (no padding: all of one length), T: prompt tokens, V: vocabulary

transformers' ``generate`` pays Python work on every token: a module call per op, a growing
cache, logits processors and stopping checks. At batch 1 on a small model that work is as large
as the weight reads that sparsity saves, so it hides the speed-up. :class:`StaticDecoder` runs
the prompt once (eager), then every new token through one ``torch.compile``d step over a
``transformers.StaticCache``: on the CPU the norms, rotary embedding and activations become
fused C++ loops and moefy's kernels are called as dispatcher operators inside the graph; on CUDA
``mode="reduce-overhead"`` replays the step as a CUDA graph. Dense and sparse models decode the
same way, so their speeds compare fairly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.sparsify.wrappers import counters_paused

DEFAULT_MAX_LENGTH = 256


class StaticDecoder:
    """Greedy decoder of one causal LM with a static cache and a compiled step.

    Args:
        model: a transformers causal LM (dense, moefied or sparsified), in eval mode.
        max_length: cache length: prompt plus new tokens may not exceed it.
        compile: compile the one-token step with ``torch.compile`` (``False``: the same loop
            eagerly, the reference the compiled step is tested against).
        mode: ``torch.compile`` mode; default ``reduce-overhead`` (CUDA graphs) when the model
            is on CUDA, torch's default on the CPU.
        count: let the sparse wrappers count the zeros they make (what ``moefy bench`` reads
            back as the shares a token reads). ``False`` decodes as a deployment would: each
            wrapper's counters (three int64 buffers, each an input of the compiled step and an
            update per call) stay out of the step; the tokens are the same.

    Example:
        >>> decoder = StaticDecoder(model, max_length=128)
        >>> ids = decoder.generate(tokenizer("The bank", return_tensors="pt").input_ids, 32)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        compile: bool = True,
        mode: str | None = None,
        count: bool = True,
    ) -> None:
        from transformers import StaticCache

        if max_length < 2:
            raise MoefyError(f"max_length must be at least 2, got {max_length}")
        self.model = model
        self.max_length = max_length
        self.device = next(model.parameters()).device
        self.count = count
        try:
            self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        except (TypeError, ValueError, AttributeError) as err:
            raise MoefyError(
                f"{type(model).__name__} has no static KV cache in transformers ({err}); "
                "decode it with generate instead (moefy generate without --compile)"
            ) from err
        if compile:
            freeze_for_compile(model)
        if mode is None and self.device.type == "cuda":
            mode = "reduce-overhead"
        self.graphs = mode == "reduce-overhead"
        self._step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            torch.compile(self._forward, dynamic=False, mode=mode) if compile else self._forward
        )

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens at cache positions (L,) -> (B, 1, V) logits of the last one."""
        return self.model(
            input_ids=tokens,
            past_key_values=self.cache,
            cache_position=positions,
            use_cache=True,
            logits_to_keep=1,
        ).logits

    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation of exactly ``new_tokens`` tokens (no end-of-text stop).

        Args:
            input_ids: (B, T) prompts of equal length, on the model's device.
            new_tokens: tokens to add, at least 1.

        Returns:
            (B, T + new_tokens) token ids.

        Raises:
            MoefyError: an empty prompt, fewer than 1 new token, or more tokens than the cache
                holds.
        """
        length = input_ids.shape[1]
        if length == 0:
            raise MoefyError("the prompt is empty: give at least one token")
        if new_tokens < 1:
            raise MoefyError(f"new_tokens must be at least 1, got {new_tokens}")
        if length + new_tokens > self.max_length:
            raise MoefyError(
                f"prompt ({length}) + new tokens ({new_tokens}) exceed the cache length "
                f"{self.max_length}; raise max_length"
            )
        # counters_paused is read when the step is traced: Dynamo guards on it, so a decoder
        # that counts and one that does not each get their own graph
        paused = contextlib.nullcontext() if self.count else counters_paused()
        with torch.inference_mode(), paused:  # the cache's tensors are made lazily in here too
            self.cache.reset()
            # the prompt runs eagerly: its length varies, the compiled step is for one token
            prefill = self._forward(input_ids, torch.arange(length, device=self.device))
            token = prefill[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens = [token]
            for step in range(new_tokens - 1):
                if self.graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                position = torch.tensor([length + step], device=self.device)
                token = self._step(token, position)[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
        return torch.cat([input_ids, *tokens], dim=1)


def freeze_for_compile(model: nn.Module) -> None:
    """Let every module that decides its kernel layout from eager-only caches decide it now
    (threshold wrappers: their transposed weights), so a compiled step traces without breaks."""
    for module in model.modules():
        freeze = getattr(module, "freeze_for_compile", None)
        if callable(freeze):
            freeze()
