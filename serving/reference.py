"""The transformers side of the serving check: greedy generation records on fixed prompts.

Runs in moefy's ``.venv`` (``check.py reference``); torch and transformers are imported only
when a record is made, so the engine venvs can import ``PROMPTS`` from here.

Example:
    >>> record = reference("runs/serving/export-hf", tokens=32)  # doctest: +SKIP
    >>> len(record["prompts"]), len(record["prompts"][0]["tokens"])
    (5, 32)
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from typing import Any

PROMPTS = (
    "The history of the city begins",
    "Scientists announced on Tuesday that",
    "def fibonacci(n):",
    "The best way to learn a new language is",
    "Shares in the company fell sharply after",
)


def package_versions(*packages: str) -> dict[str, str]:
    """Python's version and each installed package's version ("not installed" otherwise)."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def greedy_record(model: Any, prompt_ids: list[int], tokens: int) -> dict[str, Any]:
    """Greedy decoding of ``tokens`` tokens after ``prompt_ids`` with the model's KV cache.

    Returns:
        ``{"prompt_ids", "tokens", "logprobs", "margins"}``: per step the chosen token, its
        log-probability (float64 log-softmax of float32 logits) and the top-1 minus top-2 logit.
    """
    import torch

    chosen, logprobs, margins = [], [], []
    with torch.inference_mode():
        output = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(tokens):
            logits = output.logits[0, -1].double()  # (V,)
            top2 = logits.topk(2)
            token = int(top2.indices[0])
            chosen.append(token)
            logprobs.append(float(logits.log_softmax(-1)[token]))
            margins.append(float(top2.values[0] - top2.values[1]))
            output = model(
                input_ids=torch.tensor([[token]]),
                past_key_values=output.past_key_values,
                use_cache=True,
            )
    return {"prompt_ids": prompt_ids, "tokens": chosen, "logprobs": logprobs, "margins": margins}


def reference(model_path: str, tokens: int) -> dict[str, Any]:
    """Greedy transformers records (float32, batch of 1) of a model folder on :data:`PROMPTS`.

    Args:
        model_path: a Hugging Face folder that ``AutoModelForCausalLM`` loads (no moefy).
        tokens: tokens to generate per prompt (end-of-sequence does not stop it).

    Returns:
        A generation record (see ``compare.py``) with transformers' tokens per second.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    start = time.perf_counter()
    prompts = [
        {"text": text, **greedy_record(model, tokenizer(text)["input_ids"], tokens)}
        for text in PROMPTS
    ]
    seconds = time.perf_counter() - start
    return {
        "engine": "transformers",
        "model": str(model_path),
        "prompts": prompts,
        "tokens_per_second": {"sequential": len(PROMPTS) * tokens / seconds},
        "versions": package_versions("torch", "transformers"),
    }
