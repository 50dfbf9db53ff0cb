"""Perplexity of wrong or empty data is a one-line MoefyError, and a nan perplexity is an error
(exit 2 on the command line), never a number printed with exit 0."""

from __future__ import annotations

import re

import pytest
import torch

from moefy.cli.main import main
from moefy.data.blocks import TokenBlocks, _empty_like
from moefy.errors import MoefyError
from moefy.eval import EvalConfig, evaluate
from moefy.eval.agreement import dense_reference, score_lm
from moefy.eval.perplexity import finite_perplexity, perplexity
from tiny_models import VOCAB, tiny_model, tiny_tokenizer, write_word_text


def _blocks(n_blocks: int = 4, block_len: int = 9) -> TokenBlocks:
    gen = torch.Generator().manual_seed(0)
    return TokenBlocks(torch.randint(3, VOCAB, (n_blocks, block_len), generator=gen))


def _nan_model():
    """A tiny Llama with finite weights whose logits overflow to +-inf, so log-softmax is nan."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.sign(torch.randn_like(model.lm_head.weight)) * 3e38)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


SCORERS = {
    "perplexity": lambda model, data: perplexity(model, data),
    "score_lm": lambda model, data: score_lm(model, data),
    "dense_reference": lambda model, data: dense_reference(model, data, 64),
    "evaluate": lambda model, data: evaluate(model, EvalConfig(), blocks=data),
}


@pytest.mark.parametrize("scorer", sorted(SCORERS))
@pytest.mark.parametrize("data", [[], None, "text", torch.zeros(2, 8, dtype=torch.long)], ids=repr)
def test_data_that_is_not_token_blocks_is_one_line(scorer, data):
    # evaluate(blocks=None) cuts the blocks from its config's text, which needs the tokenizer
    with pytest.raises(MoefyError, match="TokenBlocks|tokenizer") as info:
        SCORERS[scorer](tiny_model("llama"), data)
    _one_line(info)


@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_blocks_without_tokens_are_one_line(scorer):
    empty = _empty_like(_blocks())  # what a rank with no share of the blocks holds
    with pytest.raises(MoefyError, match="no tokens") as info:
        SCORERS[scorer](tiny_model("llama"), empty)
    _one_line(info)


@pytest.mark.parametrize("scorer", ["perplexity", "score_lm", "evaluate"])
def test_a_nan_perplexity_is_an_error(scorer):
    with pytest.raises(MoefyError, match="perplexity is nan") as info:
        SCORERS[scorer](_nan_model(), _blocks())
    _one_line(info)


@pytest.mark.parametrize(
    ("nll_sum", "n_tokens", "pattern"),
    [
        (float("nan"), 4, "perplexity is nan"),
        (float("inf"), 4, "perplexity is infinite"),
        (4 * 800.0, 4, "perplexity is infinite"),  # exp(800) overflows a float64
        (0.0, 0, "no predictions"),
    ],
)
def test_finite_perplexity_refuses_what_is_not_a_number(nll_sum, n_tokens, pattern):
    with pytest.raises(MoefyError, match=pattern):
        finite_perplexity(nll_sum, n_tokens)


def test_finite_perplexity_of_a_uniform_model():
    ppl, nll = finite_perplexity(3 * torch.log(torch.tensor(VOCAB.__float__())).item(), 3)
    assert ppl == pytest.approx(VOCAB) and nll == pytest.approx(torch.log(torch.tensor(128.0)))


@pytest.fixture
def nan_folder(tmp_path):
    folder = tmp_path / "nan-model"
    _nan_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate"],
        ["sweep", "--methods", "dense", "--agreement-tokens", "64"],
    ],
    ids=["evaluate", "sweep"],
)
def test_the_cli_exits_2_on_a_nan_perplexity(nan_folder, tmp_path, capsys, command):
    text = write_word_text(tmp_path / "text.jsonl", docs=200)
    argv = [*command, "--model", str(nan_folder), "--data", str(text), "--tokens", "256"]
    argv += ["--block-len", "32", "--out", str(tmp_path / "out")]
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()  # progress bars come first
    assert "Traceback" not in captured.err
    assert [line for line in lines if "error:" in line] == lines[-1:]
    assert "perplexity is nan" in lines[-1], captured.err
    assert re.search(r"\bnan\b", captured.out) is None  # no nan figure was printed
