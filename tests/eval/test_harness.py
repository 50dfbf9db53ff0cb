"""evaluate(): agreement against hand computations, classifiers on trivially separable cases,
config and input errors."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.eval import EvalConfig, dense_reference, evaluate
from moefy.eval.classify import (
    ClassificationTask,
    mean_pooled_embeddings,
    probe_predictions,
    zero_shot_predictions,
)
from moefy.eval.perplexity import perplexity
from tiny_models import VOCAB, tiny_model, tiny_tokenizer


def _blocks(n_blocks: int = 6, block_len: int = 10, seed: int = 0) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n_blocks, block_len), generator=gen)
    return TokenBlocks(ids, "random", "evaluation")


AGREE = EvalConfig(tasks=("perplexity", "agreement"), batch_size=4)


def test_dense_against_itself_agrees_fully():
    model, blocks = tiny_model("llama"), _blocks()
    reference = dense_reference(model, blocks, n_tokens=40, batch_size=4)
    report = evaluate(model, AGREE, reference=reference, blocks=blocks)
    assert report.lm.top1_agreement == 1.0
    assert abs(report.lm.kl_to_dense) < 1e-3  # the reference is stored in float16
    assert report.lm.agreement_tokens == 4 * 9  # 40 tokens round up to 4 blocks of 10
    assert report.lm.perplexity == pytest.approx(perplexity(model, blocks, 4).perplexity)


def test_agreement_and_kl_match_a_hand_computation():
    dense, blocks = tiny_model("llama"), _blocks()
    other = copy.deepcopy(dense)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        other.lm_head.weight.add_(torch.randn(other.lm_head.weight.shape, generator=gen))
    reference = dense_reference(dense, blocks, n_tokens=30, batch_size=4)
    report = evaluate(other, AGREE, reference=reference, blocks=blocks)
    with torch.no_grad():
        ids = blocks.input_ids[: reference.num_blocks]
        mine = torch.log_softmax(other(input_ids=ids).logits[:, :-1].double(), -1)
    ref = reference.log_probs.double()
    kl = (ref.exp() * (ref - mine)).sum(-1).mean()
    top1 = (ref.argmax(-1) == mine.argmax(-1)).double().mean()
    assert report.lm.kl_to_dense == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    assert report.lm.kl_to_dense > 1e-2
    assert report.lm.top1_agreement == pytest.approx(float(top1))
    assert report.lm.top1_agreement < 1.0


class KeywordForCausalLM(nn.Module):
    """A 'language model' whose every next-token guess is the words of the document's class:
    tokens of ``cue_a`` anywhere in the sequence favour ``label_a`` tokens, else ``label_b``."""

    def __init__(self, cue_a: list[int], label_a: list[int], label_b: list[int]) -> None:
        super().__init__()
        self.config = SimpleNamespace(is_encoder_decoder=False)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.cue_a, self.label_a, self.label_b = cue_a, label_a, label_b

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        logits = torch.zeros(*input_ids.shape, VOCAB)
        for row, seq in enumerate(input_ids.tolist()):
            favoured = self.label_a if set(seq) & set(self.cue_a) else self.label_b
            logits[row, :, favoured] = 5.0
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


MONEY = ["the bank shares", "market shares", "a shares bank", "the market shares and the bank"]
ARTS = ["the film", "music and film", "a game", "the player and the team"]


@pytest.mark.parametrize(
    "verbalizers",
    [{"money": " market", "arts": " film"}, {"money": " market bank", "arts": " film music"}],
    ids=["one-token", "two-token"],
)
def test_zero_shot_labels_a_separable_case_perfectly(verbalizers):
    tok = tiny_tokenizer()
    task = ClassificationTask("toy", "none", "Text: {text} is", verbalizers)
    model = KeywordForCausalLM(
        _ids(tok, "shares"),  # no verbaliser holds the cue
        _ids(tok, verbalizers["money"]),
        _ids(tok, verbalizers["arts"]),
    )
    docs = MONEY + ARTS
    predicted = zero_shot_predictions(model, tok, task, docs, max_doc_tokens=16, batch_size=3)
    assert predicted == ["money"] * len(MONEY) + ["arts"] * len(ARTS)


def test_linear_probe_labels_a_separable_case_perfectly():
    tok, model = tiny_tokenizer(), tiny_model("bert")
    train_docs = [d + " " + d for d in MONEY] + [d + " " + d for d in ARTS] + MONEY + ARTS
    train_labels = (["money"] * 4 + ["arts"] * 4) * 2
    test_docs = ["shares of the bank", "film and game"]
    with torch.no_grad():
        train = mean_pooled_embeddings(model, tok, train_docs, 16, batch_size=5)
        test = mean_pooled_embeddings(model, tok, test_docs, 16, batch_size=5)
    assert train.shape == (16, model.config.hidden_size)
    assert probe_predictions(train, train_labels, test) == ["money", "arts"]


def test_mean_pooling_ignores_padding():
    tok, model = tiny_tokenizer(), tiny_model("bert")
    with torch.no_grad():
        alone = mean_pooled_embeddings(model, tok, ["the bank"], 16)
        padded = mean_pooled_embeddings(model, tok, ["the bank", "the film and the music"], 16)
    torch.testing.assert_close(alone[0], padded[0], rtol=1e-5, atol=1e-5)


def test_errors_are_one_line():
    model, blocks = tiny_model("llama"), _blocks()
    with pytest.raises(MoefyError, match="dense_reference"):
        evaluate(model, AGREE, blocks=blocks)
    with pytest.raises(MoefyError, match="unknown task"):
        EvalConfig(tasks=("nonsense",))
    with pytest.raises(MoefyError, match="tasks"):
        EvalConfig(tasks=())
    with pytest.raises(MoefyError, match="not a causal LM"):
        evaluate(tiny_model("bert"), EvalConfig(tasks=("perplexity",)), blocks=blocks)
    other = _blocks(seed=1)
    reference = dense_reference(model, other, n_tokens=20)
    with pytest.raises(MoefyError, match="other blocks"):
        evaluate(model, AGREE, reference=reference, blocks=blocks)
    with pytest.raises(MoefyError, match="probe needs"):
        probe_predictions(torch.zeros(2, 3), ["a", "a"], torch.zeros(1, 3))


def test_config_round_trips_through_json():
    config = EvalConfig(tasks=("perplexity", "bbc-topic"), tokens=1024, classify_examples=10)
    assert EvalConfig.from_json(config.to_json()) == config


def _perturbed_row() -> dict:
    """evaluate() of a changed tiny llama against the dense one (this process's shard)."""
    model, blocks = tiny_model("llama"), _blocks(n_blocks=7)
    reference = dense_reference(model, blocks, n_tokens=50, batch_size=2)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)
    reference.cost = evaluate(model, blocks=blocks).cost
    return evaluate(other, AGREE, reference=reference, blocks=blocks).row()


def _two_rank_worker(rank: int, out_dir: str) -> None:
    import json

    with open(f"{out_dir}/rank{rank}.json", "w") as file:
        json.dump(_perturbed_row(), file)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    import json

    from gloo import WORLD, spawn

    spawn(_two_rank_worker, str(tmp_path))
    expected = _perturbed_row()
    for rank in range(WORLD):
        row = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert row.keys() == expected.keys()
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-6), (rank, key)
