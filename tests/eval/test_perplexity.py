"""Perplexity: against a hand computation, a uniform model, and a two-process run."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moefy.data.blocks import TokenBlocks
from moefy.data.text import load_text
from moefy.errors import MoefyError
from moefy.eval.perplexity import PerplexityResult, perplexity
from moefy.models.load import load_model
from tiny_models import VOCAB, tiny_model

WORLD = 2
SMOLLM2_EVAL_TOKENS = 8192


def _random_blocks(n_blocks: int = 5, block_len: int = 9, seed: int = 0) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    return TokenBlocks(
        torch.randint(3, VOCAB, (n_blocks, block_len), generator=gen), "random", "evaluation"
    )


def _hand_nll(model, data: TokenBlocks) -> tuple[float, int]:
    """Mean next-token NLL, one block and one position at a time, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for block in data.input_ids:
            logits = model(input_ids=block[None]).logits[0].double()  # (T, V)
            for t in range(len(block) - 1):
                total -= torch.log_softmax(logits[t], dim=-1)[block[t + 1]].item()
                count += 1
    return total / count, count


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_a_hand_computation(arch):
    model, data = tiny_model(arch), _random_blocks()
    result = perplexity(model, data, batch_size=2)  # 5 blocks: the last batch is partial
    nll, count = _hand_nll(model, data)
    assert result.n_tokens == count == 5 * 8
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert 0.5 * VOCAB < result.perplexity < 2 * VOCAB  # a random model is near uniform


def test_does_not_depend_on_the_batch_size():
    model, data = tiny_model("qwen3"), _random_blocks(n_blocks=7)
    one, many = perplexity(model, data, batch_size=1), perplexity(model, data, batch_size=16)
    assert one.n_tokens == many.n_tokens
    assert one.nll == pytest.approx(many.nll, rel=1e-6)


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: a uniform next-token distribution
    result = perplexity(model, _random_blocks())
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-6)
    assert result.nll == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_runs_in_eval_mode_and_restores_the_mode():
    model, data = tiny_model("gpt2"), _random_blocks()  # GPT-2 has dropout 0.1
    expected = perplexity(model, data)
    model.train()
    assert perplexity(model, data) == expected  # dropout off
    assert model.training


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_refuses_models_that_are_not_causal(arch):
    with pytest.raises(MoefyError, match="perplexity needs a causal language model"):
        perplexity(tiny_model(arch), _random_blocks())


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(MoefyError, match="at least 2 tokens"):
        perplexity(model, TokenBlocks(torch.ones(4, 1, dtype=torch.long)))
    with pytest.raises(MoefyError, match="batch size"):
        perplexity(model, _random_blocks(), batch_size=0)


def test_result_to_dict():
    result = PerplexityResult(perplexity=math.e, nll=1.0, n_tokens=3)
    assert json.loads(json.dumps(result.to_dict())) == {
        "perplexity": math.e,
        "nll": 1.0,
        "n_tokens": 3,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        model = tiny_model("llama")
        results = {
            "seven_blocks": perplexity(model, _random_blocks(n_blocks=7), batch_size=2).to_dict(),
            # One block for two ranks: rank 1 has an empty shard.
            "one_block": perplexity(model, _random_blocks(n_blocks=1)).to_dict(),
        }
        with open(f"{out_dir}/rank{rank}.json", "w") as file:
            json.dump(results, file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    model = tiny_model("llama")
    expected = {
        "seven_blocks": perplexity(model, _random_blocks(n_blocks=7)),
        "one_block": perplexity(model, _random_blocks(n_blocks=1)),
    }
    for rank in range(WORLD):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key, single in expected.items():
            assert results[key]["n_tokens"] == single.n_tokens
            assert results[key]["nll"] == pytest.approx(single.nll, rel=1e-6), (rank, key)


@pytest.mark.slow
def test_smollm2_on_bbc_news_has_a_sane_perplexity():
    model, tokenizer = load_model("smollm2-135m")
    data = load_text("bbc-news").blocks(
        tokenizer, "evaluation", block_len=256, n_tokens=SMOLLM2_EVAL_TOKENS
    )
    result = perplexity(model, data)
    print(
        f"SmolLM2-135M perplexity on {result.n_tokens} bbc-news evaluation tokens: "
        f"{result.perplexity:.2f}"
    )
    assert result.n_tokens == 32 * 255
    assert 20 < result.perplexity < 45
