"""Compare an engine's greedy generations with transformers' and summarise a serving check.

Standard library only: this module runs in moefy's ``.venv`` and in each engine's own venv.

A *generation record* is what one engine wrote for one model on the fixed prompts::

    {"engine": "vllm", "model": "/path", "tokens_per_second": 41.5, "seconds": 3.9,
     "prompts": [{"prompt_ids": [...], "tokens": [...32 ids...], "logprobs": [...32 floats...],
                  "margins": [...]}]}            # margins: transformers only (top-1 - top-2 logit)

``compare_generations(reference, engine)`` lines the engine's prompts up with the reference's
(the engines are fed the reference's prompt ids, so both see the same tokens) and reports, per
prompt, whether the 32 tokens are equal, where they first differ, and the largest absolute
difference of the chosen tokens' log-probabilities over the positions where both chose the same
token so far. A divergence at a position where transformers' own top-2 margin is below
``TIE_MARGIN`` is labelled a near tie: float rounding in another kernel can flip it.

Greedy sequences stop being comparable at their first difference, so one flipped choice hides
everything after it. Engine records may also carry a *teacher-forced* pass (``"forced"`` per
prompt: the engine fed the prompt and transformers' 32 tokens, and at each of those positions
its own argmax and the log-probability it gives transformers' token)::

    "forced": {"tokens": [...32 argmax ids...], "logprobs": [...32 floats...]}

``compare_forced`` counts the positions whose argmax is transformers' token and the largest
log-probability difference over all of them: how often the engine would choose what
transformers chooses given the same context, which a single early flip cannot hide.

Example:
    >>> ref = {"prompts": [{"prompt_ids": [1], "tokens": [5, 6], "logprobs": [-0.1, -0.2]}]}
    >>> eng = {"prompts": [{"prompt_ids": [1], "tokens": [5, 6], "logprobs": [-0.1, -0.25]}]}
    >>> round(compare_generations(ref, eng)["max_abs_logprob_diff"], 3)
    0.05
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# Logit margin (top-1 minus top-2, in nats) under which a greedy choice is called a near tie.
TIE_MARGIN = 1e-3


class CheckError(ValueError):
    """A serving check's input is unusable (mismatched prompts, a malformed record)."""


def first_divergence(expected: list[int], actual: list[int]) -> int | None:
    """Index of the first position where two token lists differ, or None when they are equal.

    A list that stops early differs at its end.

    Example:
        >>> first_divergence([1, 2, 3], [1, 2, 4])
        2
        >>> first_divergence([1, 2], [1, 2]) is None
        True
    """
    for position, (want, got) in enumerate(zip(expected, actual, strict=False)):
        if want != got:
            return position
    if len(expected) != len(actual):
        return min(len(expected), len(actual))
    return None


def max_abs_difference(expected: list[float], actual: list[float], upto: int) -> float | None:
    """Largest ``|expected[i] - actual[i]|`` over ``i < upto``; None when ``upto`` is 0.

    Example:
        >>> max_abs_difference([-1.0, -2.0, -3.0], [-1.5, -2.0, -9.0], upto=2)
        0.5
    """
    pairs = list(zip(expected[:upto], actual[:upto], strict=True))
    if not pairs:
        return None
    return max(abs(want - got) for want, got in pairs)


def compare_prompt(reference: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    """Compare one prompt's generation of an engine with the reference's.

    Args:
        reference: the transformers record of the prompt (``tokens``, ``logprobs``, ``margins``).
        engine: the engine's record of the same prompt (``tokens``, ``logprobs``).

    Returns:
        ``{"match", "first_divergence", "near_tie", "reference_margin", "compared_positions",
        "max_abs_logprob_diff", "reference_tokens", "engine_tokens"}``.
    """
    if reference["prompt_ids"] != engine["prompt_ids"]:
        raise CheckError("the engine was given other prompt ids than the reference")
    divergence = first_divergence(reference["tokens"], engine["tokens"])
    compared = len(reference["tokens"]) if divergence is None else divergence
    margins = reference.get("margins") or []
    margin = margins[divergence] if divergence is not None and divergence < len(margins) else None
    return {
        "match": divergence is None,
        "first_divergence": divergence,
        "near_tie": margin is not None and margin < TIE_MARGIN,
        "reference_margin": margin,
        "compared_positions": compared,
        "max_abs_logprob_diff": max_abs_difference(
            reference["logprobs"], engine["logprobs"], compared
        ),
        "reference_tokens": reference["tokens"],
        "engine_tokens": engine["tokens"],
    }


def compare_forced(reference: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any] | None:
    """Teacher-forced agreement of one prompt, or None when the engine record has no pass.

    Args:
        reference: the transformers record of the prompt (``tokens``, ``logprobs``).
        engine: the engine's record of the same prompt, with ``forced`` (see the module
            docstring).

    Returns:
        ``{"agreeing": positions whose engine argmax is the reference token, "positions": n,
        "max_abs_logprob_diff": over all n positions}``.

    Example:
        >>> ref = {"tokens": [5, 6], "logprobs": [-0.1, -0.2]}
        >>> eng = {"forced": {"tokens": [5, 7], "logprobs": [-0.1, -0.9]}}
        >>> compare_forced(ref, eng)["agreeing"]
        1
    """
    forced = engine.get("forced")
    if forced is None:
        return None
    want, got = reference["tokens"], forced.get("tokens")
    if (
        not isinstance(got, list)
        or len(got) != len(want)
        or len(forced.get("logprobs", [])) != len(want)
    ):
        raise CheckError("the engine's teacher-forced pass does not cover the reference's tokens")
    return {
        "agreeing": sum(a == b for a, b in zip(want, got, strict=True)),
        "positions": len(want),
        "max_abs_logprob_diff": max_abs_difference(
            reference["logprobs"], forced["logprobs"], len(want)
        ),
    }


def _forced_total(per_prompt: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The teacher-forced results of all prompts summed (None when any prompt has none)."""
    if not per_prompt or any(p is None for p in per_prompt):
        return None
    diffs = [p["max_abs_logprob_diff"] for p in per_prompt if p["max_abs_logprob_diff"] is not None]
    agreeing, positions = (
        sum(p["agreeing"] for p in per_prompt),
        sum(p["positions"] for p in per_prompt),
    )
    return {
        "agreeing": agreeing,
        "positions": positions,
        "agreement": agreeing / positions if positions else None,
        "max_abs_logprob_diff": max(diffs) if diffs else None,
    }


def compare_generations(reference: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    """Compare an engine's generation record with the transformers reference, prompt by prompt.

    Args:
        reference: the transformers generation record (see the module docstring).
        engine: the engine's record for the same model and prompts.

    Returns:
        ``{"greedy_match": all prompts equal, "prompts_matching": n, "prompts": n,
        "max_abs_logprob_diff": over every compared position (None when none),
        "teacher_forced": {"agreeing", "positions", "agreement", "max_abs_logprob_diff"} or None
        when the engine record has no teacher-forced pass, "per_prompt": [...]}``.
    """
    if len(reference["prompts"]) != len(engine["prompts"]):
        raise CheckError(
            f"the reference has {len(reference['prompts'])} prompts, "
            f"the engine {len(engine['prompts'])}"
        )
    pairs = zip(reference["prompts"], engine["prompts"], strict=True)
    pairs = list(pairs)
    per_prompt = [compare_prompt(ref, eng) for ref, eng in pairs]
    forced = [compare_forced(ref, eng) for ref, eng in pairs]
    for prompt, one in zip(per_prompt, forced, strict=True):
        prompt["teacher_forced"] = one
    diffs = [p["max_abs_logprob_diff"] for p in per_prompt if p["max_abs_logprob_diff"] is not None]
    return {
        "greedy_match": all(p["match"] for p in per_prompt),
        "prompts_matching": sum(p["match"] for p in per_prompt),
        "prompts": len(per_prompt),
        "max_abs_logprob_diff": max(diffs) if diffs else None,
        "teacher_forced": _forced_total(forced),
        "per_prompt": per_prompt,
    }


def speed_ratio(model_speed: float | None, dense_speed: float | None) -> float | None:
    """The model's tokens per second over the dense model's; None when either is missing or 0.

    Example:
        >>> speed_ratio(30.0, 20.0)
        1.5
    """
    if not model_speed or not dense_speed or not math.isfinite(model_speed / dense_speed):
        return None
    return model_speed / dense_speed


def summarise(
    engine: str,
    checks: dict[str, dict[str, Any]],
    speeds: dict[str, dict[str, float | None]],
    info: dict[str, Any],
) -> dict[str, Any]:
    """The JSON summary of one engine's run.

    Args:
        engine: the engine's name ("vllm", "llamacpp").
        checks: role ("model", "dense") -> :func:`compare_generations` result.
        speeds: role -> {setting: tokens per second} (settings such as "sequential", "batched").
        info: versions, paths and settings to record as they are.

    Returns:
        ``{"engine", "passed", "checks", "tokens_per_second", "speed_ratio", "info"}``; ``passed``
        is True when every checked model's greedy tokens match; ``speed_ratio`` is the model's
        tokens/s over the dense model's, per setting present in both.
    """
    model, dense = speeds.get("model", {}), speeds.get("dense", {})
    return {
        "engine": engine,
        "passed": bool(checks) and all(c["greedy_match"] for c in checks.values()),
        "checks": checks,
        "tokens_per_second": speeds,
        "speed_ratio": {k: speed_ratio(model.get(k), dense.get(k)) for k in model if k in dense},
        "info": info,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines for a summary (printed by the check script).

    Example:
        >>> speeds = {"model": {"sequential": 2.0}, "dense": {"sequential": 1.0}}
        >>> s = summarise("vllm", {}, speeds, {})
        >>> print(format_summary(s))
        vllm: FAILED
          tokens/s sequential: model 2.0, dense 1.0, ratio 2.00
    """
    lines = [f"{summary['engine']}: {'passed' if summary['passed'] else 'FAILED'}"]
    for role, check in summary["checks"].items():
        diff = check["max_abs_logprob_diff"]
        diff_text = "n/a" if diff is None else f"{diff:.2e}"
        lines.append(
            f"  {role}: greedy {check['prompts_matching']}/{check['prompts']} prompts equal, "
            f"max |logprob diff| {diff_text}"
        )
        forced = check.get("teacher_forced")
        if forced:
            forced_diff = forced["max_abs_logprob_diff"]
            lines.append(
                f"    teacher-forced: {forced['agreeing']}/{forced['positions']} positions choose "
                f"transformers' token, max |logprob diff| "
                f"{'n/a' if forced_diff is None else f'{forced_diff:.2e}'}"
            )
        for index, prompt in enumerate(check["per_prompt"]):
            if not prompt["match"]:
                tie = " (near tie)" if prompt["near_tie"] else ""
                lines.append(
                    f"    prompt {index}: first differs at token {prompt['first_divergence']}, "
                    f"reference margin {prompt['reference_margin']}{tie}"
                )
    model = summary["tokens_per_second"].get("model", {})
    dense = summary["tokens_per_second"].get("dense", {})
    for setting, ratio in summary["speed_ratio"].items():
        ratio_text = "n/a" if ratio is None else f"{ratio:.2f}"
        lines.append(
            f"  tokens/s {setting}: model {model[setting]:.1f}, dense {dense[setting]:.1f}, "
            f"ratio {ratio_text}"
        )
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(partial, path)


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read a generation record, checking the fields the comparison needs."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckError(f"cannot read the generation record {path}: {err}") from err
    prompts = record.get("prompts") if isinstance(record, dict) else None
    needed = ("prompt_ids", "tokens", "logprobs")
    if not isinstance(prompts, list) or not all(
        isinstance(p, dict) and all(k in p for k in needed) for p in prompts
    ):
        raise CheckError(f"{path} is not a generation record: each prompt needs {needed}")
    return record
