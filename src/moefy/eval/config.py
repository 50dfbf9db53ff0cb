"""The evaluation config: which measurements, on how much text, with which seeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moefy.errors import MoefyError
from moefy.jsonconfig import JsonConfig
from moefy.validate import check_int

CONFIG_VERSION = 1
# settings that count something: integers >= 1
_COUNTS = (
    "tokens",
    "agreement_tokens",
    "batch_size",
    "classify_examples",
    "probe_examples",
    "max_doc_tokens",
)

# What evaluate() can measure. Cost (FLOPs and bytes per token) is always measured.
TASKS = ("perplexity", "agreement", "bbc-topic", "tweet-sentiment")


@dataclass(frozen=True)
class EvalConfig(JsonConfig):
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

    VERSION: ClassVar[int] = CONFIG_VERSION

    def __post_init__(self) -> None:
        tasks = tuple(self.tasks) if isinstance(self.tasks, (list, tuple)) else None
        if tasks is None or not tasks:
            raise MoefyError(f"EvalConfig.tasks must be a non-empty list of {TASKS}")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise MoefyError(f"EvalConfig: unknown task(s) {unknown}; known: {list(TASKS)}")
        object.__setattr__(self, "tasks", tasks)
        for name in _COUNTS:
            check_int(f"EvalConfig.{name}", getattr(self, name), minimum=1)
        check_int("EvalConfig.block_len", self.block_len, minimum=2)
        check_int("EvalConfig.seed", self.seed)
        self.check_version()
