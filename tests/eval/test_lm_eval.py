"""lm-eval wrapper: a local (offline) multiple-choice task on a tiny model, scored as by hand."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from moefy.errors import MoefyError
from moefy.eval.lm_eval import INSTALL_HINT, lm_eval_model, run_lm_eval
from tiny_models import tiny_model, tiny_tokenizer

# `make install` installs the extra, so CI runs these; a bare `pip install moefy` skips them.
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="the optional lm-eval extra is missing"
)

TASK = "moefy_tiny_topic"
CHOICES = ["market", "film"]
DOCS = [
    {"text": "the bank shares", "label": 0},
    {"text": "a film and music", "label": 1},
    {"text": "the team player", "label": 1},
    {"text": "election minister", "label": 0},
    {"text": "phone software in a game", "label": 1},
]


def _write_task(folder) -> None:
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{text}} is about"\n'
        f"doc_to_choice: {json.dumps(CHOICES)}\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
    )


def _hand_accuracy(model, tokenizer) -> float:
    """argmax over choices of log p(' choice' | text + ' is about'), one sequence at a time."""
    correct = 0
    with torch.no_grad():
        for doc in DOCS:
            context = tokenizer(doc["text"] + " is about", add_special_tokens=False)["input_ids"]
            scores = []
            for choice in CHOICES:
                cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([context + cont])
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                scores.append(
                    sum(float(log_probs[len(context) - 1 + i, t]) for i, t in enumerate(cont))
                )
            correct += int(max(range(len(CHOICES)), key=scores.__getitem__) == doc["label"])
    return correct / len(DOCS)


@needs_lm_eval
@pytest.mark.parametrize("seed", [0, 1])
def test_local_task_runs_offline_and_scores_as_by_hand(tmp_path, seed):
    _write_task(tmp_path)
    model, tokenizer = tiny_model("llama", seed=seed), tiny_tokenizer()
    out = run_lm_eval(
        model, tokenizer, [TASK], include_path=tmp_path, batch_size=2, builtin_tasks=False
    )
    metrics = out["results"][TASK]
    assert metrics["acc,none"] == pytest.approx(_hand_accuracy(model, tokenizer))


@needs_lm_eval
def test_wrapper_is_an_lm_eval_model():
    from lm_eval.api.model import LM

    lm = lm_eval_model(tiny_model("qwen3"), tiny_tokenizer(), batch_size=4)
    assert isinstance(lm, LM) and lm.batch_size == 4


@needs_lm_eval
def test_errors_are_one_line(tmp_path):
    with pytest.raises(MoefyError, match="tokenizer"):
        lm_eval_model(tiny_model("llama"))
    with pytest.raises(MoefyError, match="causal"):
        lm_eval_model(tiny_model("bert"), tiny_tokenizer())
    with pytest.raises(MoefyError, match="unknown lm-eval task"):
        run_lm_eval(
            tiny_model("llama"),
            tiny_tokenizer(),
            ["no_such_task"],
            include_path=tmp_path,
            builtin_tasks=False,
        )


def test_missing_extra_is_a_one_line_error_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(MoefyError, match="lm-eval is not installed") as err:
        lm_eval_model(tiny_model("llama"), tiny_tokenizer())
    assert INSTALL_HINT in str(err.value) and "\n" not in str(err.value)
