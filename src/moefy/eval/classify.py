"""Text classification as a quality measure: zero-shot label likelihood (decoders), linear probe
on frozen embeddings (encoders).

Zero-shot: each document (cut to ``max_doc_tokens`` tokens) is put in the task's prompt, and the
label whose verbaliser the model finds most likely after the prompt wins (summed log-probability
of the verbaliser's tokens; single-token verbalisers need one forward per document).
Probe: mean-pooled last hidden states of calibration-split documents train a logistic regression
(scikit-learn, fixed seed) that labels evaluation-split documents.

Shape legend:
    B: documents per batch, L: padded sequence length, V: vocabulary, D: hidden width
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moefy.dist import all_reduce_sum_, rank_and_world
from moefy.errors import MoefyError


@dataclass(frozen=True)
class ClassificationTask:
    """A labelled built-in text turned into a classification task.

    Attributes:
        name: task name (``bbc-topic``).
        text: the labelled text source (``bbc-news``).
        prompt: zero-shot prompt with one ``{text}`` slot; the verbaliser follows it directly.
        verbalizers: label -> the words that name it after the prompt (leading space included).
    """

    name: str
    text: str
    prompt: str
    verbalizers: dict[str, str]

    def __post_init__(self) -> None:
        if self.prompt.count("{text}") != 1:
            raise MoefyError(f"task {self.name}: the prompt needs exactly one {{text}} slot")


CLASSIFICATION_TASKS: dict[str, ClassificationTask] = {
    task.name: task
    for task in (
        ClassificationTask(
            "bbc-topic",
            "bbc-news",
            "Article: {text}\nQuestion: Is this article about business, entertainment, politics, "
            "sport or technology?\nAnswer:",
            {
                "business": " business",
                "entertainment": " entertainment",
                "politics": " politics",
                "sport": " sport",
                "tech": " technology",
            },
        ),
        ClassificationTask(
            "tweet-sentiment",
            "tweets",
            "Tweet: {text}\nQuestion: Is the sentiment of this tweet positive or negative?\n"
            "Answer:",
            {"negative": " negative", "positive": " positive"},
        ),
    )
}


@dataclass(frozen=True)
class ClassificationResult:
    """Accuracy of one model on one classification task.

    Attributes:
        task: task name.
        method: ``zero-shot`` or ``linear-probe``.
        accuracy: share of evaluation examples labelled correctly.
        n_examples: evaluation examples scored (all ranks).
        chance: accuracy of always answering the most frequent label of those examples.
    """

    task: str
    method: str
    accuracy: float
    n_examples: int
    chance: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def sample_examples(
    task: ClassificationTask, split: str, n: int, seed: int
) -> tuple[list[str], list[str]]:
    """``n`` seeded (document, label) pairs of one split of the task's text.

    Returns:
        ``(documents, labels)``; fewer than ``n`` if the split is smaller.
    """
    from moefy.data.text import load_text

    source = load_text(task.text)
    if source.labels is None:
        raise MoefyError(f"task {task.name}: text {task.text!r} has no labels")
    indices = source.split_indices(split)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(indices), generator=gen)[:n].tolist()
    chosen = [indices[i] for i in order]
    return [source.documents[i] for i in chosen], [source.labels[i] for i in chosen]


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad(sequences: list[list[int]], pad_id: int, device: torch.device):
    """Right-padded (B, L) ids and (B, L) attention mask."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def _logits_to_keep_supported(model: nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _by_length(sequences: list[list[int]]) -> list[list[int]]:
    """Indices of ``sequences`` grouped by length (batches of equal length need no padding)."""
    groups: dict[int, list[int]] = {}
    for i, seq in enumerate(sequences):
        groups.setdefault(len(seq), []).append(i)
    return list(groups.values())


def _continuation_log_probs(
    model: nn.Module,
    contexts: list[list[int]],
    continuations: list[list[int]],
    batch_size: int,
) -> list[float]:
    """Summed log p(continuation | context) for each pair.

    Sequences of equal length are batched together, so no padding (and no attention mask) is
    needed and each score equals that of the sequence run alone; only the positions that predict
    continuation tokens get logits when the model supports ``logits_to_keep``.
    """
    device = next(model.parameters()).device
    sequences = [c + k for c, k in zip(contexts, continuations, strict=True)]
    keep_supported = _logits_to_keep_supported(model)
    scores = [0.0] * len(sequences)
    for members in _by_length(sequences):
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            ids = torch.tensor([sequences[i] for i in rows], dtype=torch.long, device=device)
            keep = max(len(continuations[i]) for i in rows) + 1  # the last `keep` positions
            options = {"logits_to_keep": keep} if keep_supported else {}
            logits = model(input_ids=ids, use_cache=False, **options).logits  # (B, <=L, V)
            log_probs = F.log_softmax(logits[:, -keep:].float(), dim=-1)  # (B, keep, V)
            for row, i in enumerate(rows):
                n = len(continuations[i])
                # kept position p predicts the token after it: the last n predictions are
                # positions keep-n-1 .. keep-2
                window = log_probs[row, keep - n - 1 : keep - 1]  # (n, V)
                targets = torch.tensor(continuations[i], dtype=torch.long, device=device)
                scores[i] = float(window.gather(-1, targets.unsqueeze(-1)).sum())
    return scores


def _last_log_probs(model: nn.Module, contexts: list[list[int]], batch_size: int) -> torch.Tensor:
    """(n, V) next-token log-probabilities after each context (equal lengths batched, no pad)."""
    device = next(model.parameters()).device
    options = {"logits_to_keep": 1} if _logits_to_keep_supported(model) else {}
    out: dict[int, torch.Tensor] = {}
    for members in _by_length(contexts):
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            ids = torch.tensor([contexts[i] for i in rows], dtype=torch.long, device=device)
            logits = model(input_ids=ids, use_cache=False, **options).logits[:, -1]  # (B, V)
            for row, lp in zip(rows, F.log_softmax(logits.float(), dim=-1), strict=True):
                out[row] = lp
    return torch.stack([out[i] for i in range(len(contexts))])


def zero_shot_predictions(
    model: nn.Module,
    tokenizer: Any,
    task: ClassificationTask,
    documents: list[str],
    max_doc_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """The label a causal LM finds most likely for each document.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        task: the task (prompt and verbalisers).
        documents: texts to label.
        max_doc_tokens: each document is cut to this many tokens.
        batch_size: sequences per forward.

    Returns:
        One label per document.

    Example:
        >>> zero_shot_predictions(model, tok, CLASSIFICATION_TASKS["bbc-topic"], docs, 128)
    """
    head, tail = task.prompt.split("{text}")
    head_ids, tail_ids = _tokens(tokenizer, head), _tokens(tokenizer, tail)
    contexts = [head_ids + _tokens(tokenizer, d)[:max_doc_tokens] + tail_ids for d in documents]
    labels = list(task.verbalizers)
    label_ids = [_tokens(tokenizer, task.verbalizers[label]) for label in labels]
    if any(not ids for ids in label_ids):
        raise MoefyError(f"task {task.name}: a verbaliser tokenises to nothing")
    if all(len(ids) == 1 for ids in label_ids):
        # Every label is one token at the same position: one forward per document.
        device = next(model.parameters()).device
        firsts = torch.tensor([ids[0] for ids in label_ids], device=device)
        best = _last_log_probs(model, contexts, batch_size)[:, firsts].argmax(-1).tolist()
    else:
        pairs_ctx = [c for c in contexts for _ in labels]
        pairs_cont = [ids for _ in contexts for ids in label_ids]
        flat = _continuation_log_probs(model, pairs_ctx, pairs_cont, batch_size)
        best = torch.tensor(flat).view(len(contexts), len(labels)).argmax(-1).tolist()
    return [labels[i] for i in best]


def mean_pooled_embeddings(
    model: nn.Module,
    tokenizer: Any,
    documents: list[str],
    max_doc_tokens: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """(n, D) float32 mean of the last hidden states over each document's tokens."""
    pad_id = _pad_id(tokenizer)
    device = next(model.parameters()).device
    cls_id = getattr(tokenizer, "cls_token_id", None)
    sep_id = getattr(tokenizer, "sep_token_id", None)
    wrap_head = [cls_id] if cls_id is not None else []
    wrap_tail = [sep_id] if sep_id is not None else []
    sequences = [wrap_head + _tokens(tokenizer, d)[:max_doc_tokens] + wrap_tail for d in documents]
    out = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = _pad(sequences[start : start + batch_size], pad_id, device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[
            -1
        ]  # (B, L, D)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * weights).sum(1) / weights.sum(1)).float().cpu())
    return torch.cat(out)


def probe_predictions(
    train_features: torch.Tensor,
    train_labels: list[str],
    test_features: torch.Tensor,
    seed: int = 0,
) -> list[str]:
    """Fit a standardised logistic regression on ``train_features``; label ``test_features``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(train_labels)) < 2:
        raise MoefyError("the linear probe needs training examples of at least two labels")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(train_features.numpy(), train_labels)
    return [str(label) for label in probe.predict(test_features.numpy())]


def _accuracy(predicted: list[str], truth: list[str], device: torch.device) -> tuple[float, int]:
    """All-rank accuracy and example count of this rank's predictions."""
    counts = torch.tensor(
        [sum(p == t for p, t in zip(predicted, truth, strict=True)), len(truth)],
        dtype=torch.float64,
        device=device,
    )
    all_reduce_sum_(counts)
    n = int(counts[1])
    return (float(counts[0]) / n if n else float("nan")), n


def classify(
    model: nn.Module,
    tokenizer: Any,
    task_name: str,
    *,
    examples: int,
    probe_examples: int,
    max_doc_tokens: int,
    batch_size: int = 8,
    seed: int = 0,
) -> ClassificationResult:
    """Accuracy of ``model`` on a built-in classification task (zero-shot or linear probe).

    Decoders (causal LMs) are scored zero-shot; other models by a linear probe on their frozen
    mean-pooled embeddings. Under torchrun each rank scores a strided share of the examples.

    Args:
        model: the model to evaluate.
        tokenizer: its tokenizer.
        task_name: a key of :data:`CLASSIFICATION_TASKS`.
        examples: evaluation-split documents to score.
        probe_examples: calibration-split documents that train the probe (encoders only).
        max_doc_tokens: each document is cut to this many tokens.
        batch_size: documents per forward.
        seed: seed of the document samples and the probe.

    Returns:
        A :class:`ClassificationResult`.

    Example:
        >>> classify(model, tok, "bbc-topic", examples=100, probe_examples=400,
        ...          max_doc_tokens=128).accuracy
    """
    from moefy.models.load import is_causal_lm

    task = CLASSIFICATION_TASKS.get(task_name)
    if task is None:
        raise MoefyError(f"unknown task {task_name!r}; known: {sorted(CLASSIFICATION_TASKS)}")
    if tokenizer is None:
        raise MoefyError(f"task {task_name} needs the model's tokenizer")
    documents, labels = sample_examples(task, "evaluation", examples, seed)
    chance = max(labels.count(label) for label in set(labels)) / len(labels)
    rank, world = rank_and_world()
    mine_docs, mine_labels = documents[rank::world], labels[rank::world]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            method = "zero-shot" if is_causal_lm(model) else "linear-probe"
            if not mine_docs:  # more ranks than examples
                predicted = []
            elif method == "zero-shot":
                predicted = zero_shot_predictions(
                    model, tokenizer, task, mine_docs, max_doc_tokens, batch_size
                )
            else:
                train_docs, train_labels = sample_examples(
                    task, "calibration", probe_examples, seed
                )
                train = mean_pooled_embeddings(
                    model, tokenizer, train_docs, max_doc_tokens, batch_size
                )
                test = mean_pooled_embeddings(
                    model, tokenizer, mine_docs, max_doc_tokens, batch_size
                )
                predicted = probe_predictions(train, train_labels, test, seed)
    finally:
        model.train(was_training)
    accuracy, n = _accuracy(predicted, mine_labels, device)
    return ClassificationResult(task_name, method, accuracy, n, chance)
