"""finetune: sparsity rises under L1 with bounded loss, resume continues the same run, budgets,
errors, the CLI, and two processes that stay in sync."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.finetune import FinetuneConfig, finetune, relufy_
from moefy.finetune.sparsity import exact_zero_share
from moefy.finetune.train import CHECKPOINT_DIR, LOG_FILE
from tiny_models import VOCAB, tiny_model


def _blocks(n_blocks: int = 16, block_len: int = 16, seed: int = 0) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    # a learnable pattern: each block counts up from a random start
    starts = torch.randint(3, VOCAB, (n_blocks, 1), generator=gen)
    ids = (starts + torch.arange(block_len)) % (VOCAB - 3) + 3
    return TokenBlocks(ids, "counting", "calibration")


def _relu_model(seed: int = 0):
    model = tiny_model("llama", seed=seed)
    relufy_(model)
    return model


@pytest.mark.parametrize("reg", ["l1", "prosparse"])
def test_l1_raises_sparsity_while_the_loss_stays_bounded(reg):
    data = _blocks()
    base = dict(max_steps=40, lr=3e-3, warmup_steps=0, batch_size=4, log_every=1)
    plain, sparse = _relu_model(), _relu_model()
    start = exact_zero_share(plain, data)
    r_plain = finetune(plain, data, FinetuneConfig(**base, reg="none"))
    r_sparse = finetune(sparse, data, FinetuneConfig(**base, reg=reg, reg_weight=2.0))
    zeros_plain, zeros_sparse = exact_zero_share(plain, data), exact_zero_share(sparse, data)
    assert zeros_sparse > zeros_plain + 0.1 and zeros_sparse > start + 0.1
    assert r_sparse.history[-1]["exact_zero"] > r_sparse.history[0]["exact_zero"]
    assert r_sparse.history[-1]["lm_loss"] < math.log(VOCAB)  # learnt more than uniform
    assert r_plain.history[-1]["lm_loss"] < r_plain.history[0]["lm_loss"]
    assert r_sparse.steps == 40 and r_sparse.stopped_by == "max_steps"
    assert r_sparse.tokens == 40 * 4 * 16


def test_resume_continues_the_same_run(tmp_path):
    data = _blocks()
    config = dict(lr=1e-3, batch_size=2, reg="prosparse", reg_weight=0.1, log_every=1)
    straight = _relu_model()
    finetune(straight, data, FinetuneConfig(max_steps=6, **config), out=tmp_path / "a")
    resumed = _relu_model()
    first = finetune(
        resumed, data, FinetuneConfig(max_steps=6, **config), out=tmp_path / "b", pause_after=3
    )
    assert first.steps == 3 and first.stopped_by == "paused"
    again = _relu_model()  # a fresh process would load the original model again
    second = finetune(again, data, FinetuneConfig(max_steps=6, **config), out=tmp_path / "b")
    assert second.resumed_from == 3 and second.steps == 6
    for (name, p), q in zip(straight.named_parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    log = (tmp_path / "b" / LOG_FILE).read_text().strip().splitlines()
    assert len(log) == 1 + 6  # header, then one row per step across both calls
    assert (tmp_path / "b" / CHECKPOINT_DIR / "state.pt").is_file()


def test_a_time_budget_stops_cleanly():
    report = finetune(_relu_model(), _blocks(), FinetuneConfig(minutes=0.002, batch_size=2))
    assert report.stopped_by == "minutes" and report.steps >= 1
    assert report.seconds >= 0.12


def test_distillation_term_is_logged():
    report = finetune(
        _relu_model(),
        _blocks(),
        FinetuneConfig(
            max_steps=2, batch_size=2, distill=1.0, reg="none", log_every=1, lr=1e-2, warmup_steps=0
        ),
    )
    assert report.history[0]["distill_kl"] == pytest.approx(0.0, abs=1e-6)  # teacher = itself
    assert report.history[1]["distill_kl"] > 1e-4


def test_errors(tmp_path):
    with pytest.raises(MoefyError, match="integer >= 1"):
        FinetuneConfig(max_steps=0)
    with pytest.raises(MoefyError, match="minutes must be > 0"):
        FinetuneConfig(minutes=0)
    with pytest.raises(MoefyError, match="give a training budget"):
        FinetuneConfig()
    with pytest.raises(MoefyError, match="unknown regulariser"):
        FinetuneConfig(max_steps=1, reg="l3")
    with pytest.raises(MoefyError, match="too short"):
        finetune(_relu_model(), _blocks(n_blocks=2), FinetuneConfig(max_steps=1, batch_size=4))
    with pytest.raises(MoefyError, match="causal"):
        finetune(tiny_model("bert"), _blocks(), FinetuneConfig(max_steps=1))
    finetune(_relu_model(), _blocks(), FinetuneConfig(max_steps=1, batch_size=2), out=tmp_path)
    with pytest.raises(MoefyError, match="other settings"):
        finetune(
            _relu_model(),
            _blocks(),
            FinetuneConfig(max_steps=2, batch_size=2, lr=1.0),
            out=tmp_path,
        )
    assert FinetuneConfig.from_json(FinetuneConfig(max_steps=3).to_json()) == FinetuneConfig(
        max_steps=3
    )


def test_cli_relufies_trains_saves_and_reports(tmp_path, capsys):
    from moefy.cli.main import main
    from tiny_models import WORDS, save_tiny_hf_folder

    model = save_tiny_hf_folder(tmp_path / "model")
    text = tmp_path / "text.jsonl"
    text.write_text(
        "".join(json.dumps({"text": " ".join(WORDS[i:] + WORDS[:i]) * 3}) + "\n" for i in range(60))
    )
    out = tmp_path / "relu"
    args = ["finetune", "--model", str(model), "--data", str(text), "--tokens", "512"]
    args += ["--block-len", "32", "--batch-size", "2", "--relufy", "--steps", "3"]
    args += ["--eval-tokens", "128", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "exact zeros" in printed and "relufied" in printed
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["before"]["exact_zero"] == 0.0  # SiLU
    assert report["after"]["exact_zero"] > 0.2  # ReLU
    assert report["report"]["steps"] == 3
    from moefy.models.load import load_model

    loaded, _ = load_model(str(out))
    assert loaded.config.hidden_act == "relu"
    code = main(["finetune", "--model", str(model), "--data", str(text), "--out", str(out)])
    assert code == 2
    assert "budget" in capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_offers_every_regulariser_and_trained_part():
    from moefy.cli import finetune_cmd
    from moefy.finetune import REGULARIZERS
    from moefy.finetune.config import TRAINED_PARTS

    assert finetune_cmd.REGULARIZERS == REGULARIZERS
    assert finetune_cmd.TRAINED_PARTS == TRAINED_PARTS


def _two_rank_worker(rank: int, out_dir: str) -> None:
    model = _relu_model()
    report = finetune(model, _blocks(), FinetuneConfig(max_steps=4, batch_size=2, log_every=1))
    torch.save(
        {"params": [p.detach() for p in model.parameters()], "tokens": report.tokens},
        f"{out_dir}/rank{rank}.pt",
    )


@pytest.mark.slow
def test_two_processes_train_one_model(tmp_path):
    from gloo import spawn

    spawn(_two_rank_worker, str(tmp_path))
    zero = torch.load(tmp_path / "rank0.pt")
    one = torch.load(tmp_path / "rank1.pt")
    assert zero["tokens"] == one["tokens"] == 4 * 2 * 2 * 16  # steps x batch x ranks x length
    for p, q in zip(zero["params"], one["params"], strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    start = _relu_model()
    assert any(
        not torch.equal(p, q) for p, q in zip(zero["params"], start.parameters(), strict=True)
    )
