"""The evaluation config: which measurements, on how much text, with which seeds."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from moefy.errors import MoefyError
from moefy.jsonconfig import loads_json

CONFIG_VERSION = 1

# What evaluate() can measure. Cost (FLOPs and bytes per token) is always measured.
TASKS = ("perplexity", "agreement", "bbc-topic", "tweet-sentiment")


@dataclass(frozen=True)
class EvalConfig:
    """What :func:`moefy.evaluate` measures and on how much text.

    Attributes:
        data: the language-modelling text (a built-in name or a path, as for ``load_text``).
        tasks: any of ``perplexity``, ``agreement`` (top-1 and KL against the dense model; needs
            a dense reference), ``bbc-topic`` (5 classes), ``tweet-sentiment`` (binary).
        tokens: evaluation tokens for perplexity (from the evaluation split).
        agreement_tokens: tokens (a prefix of the perplexity blocks) compared with the dense
            model; the dense log-probabilities are held in memory as float16, so this bounds
            memory at ``agreement_tokens * vocab * 2`` bytes.
        block_len: tokens per block.
        batch_size: blocks (or classification examples) per forward pass.
        classify_examples: evaluation-split documents scored per classification task.
        probe_examples: calibration-split documents that train an encoder's linear probe.
        max_doc_tokens: each document is cut to this many tokens before it is classified.
        seed: seed of the document sample for classification and of the probe.
        version: config format version.

    Example:
        >>> cfg = EvalConfig(tasks=("perplexity", "bbc-topic"), tokens=4096)
        >>> EvalConfig.from_json(cfg.to_json()) == cfg
        True
    """

    data: str = "bbc-news"
    tasks: tuple[str, ...] = ("perplexity",)
    tokens: int = 8192
    agreement_tokens: int = 2048
    block_len: int = 256
    batch_size: int = 8
    classify_examples: int = 100
    probe_examples: int = 400
    max_doc_tokens: int = 128
    seed: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        tasks = tuple(self.tasks) if isinstance(self.tasks, (list, tuple)) else None
        if tasks is None or not tasks:
            raise MoefyError(f"EvalConfig.tasks must be a non-empty list of {TASKS}")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise MoefyError(f"EvalConfig: unknown task(s) {unknown}; known: {list(TASKS)}")
        object.__setattr__(self, "tasks", tasks)
        for name in (
            "tokens",
            "agreement_tokens",
            "batch_size",
            "classify_examples",
            "probe_examples",
            "max_doc_tokens",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise MoefyError(f"EvalConfig.{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.block_len) or self.block_len < 2:
            raise MoefyError(
                f"EvalConfig.block_len must be an integer >= 2, not {self.block_len!r}"
            )
        if not _is_int(self.seed):
            raise MoefyError(f"EvalConfig.seed must be an integer, got {self.seed!r}")
        if self.version != CONFIG_VERSION:
            raise MoefyError(
                f"EvalConfig version {self.version!r} is not supported (this moefy reads "
                f"version {CONFIG_VERSION})"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["tasks"] = list(self.tasks)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(data, dict):
            raise MoefyError(f"EvalConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoefyError(f"EvalConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvalConfig:
        """Rebuild a config from :meth:`to_json` output."""
        try:
            data = loads_json(text)
        except json.JSONDecodeError as err:
            raise MoefyError(f"EvalConfig: not valid JSON ({err})") from None
        return cls.from_dict(data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
