"""A finetune checkpoint is read with ``weights_only=True``: a crafted ``state.pt`` cannot run code,
and every broken checkpoint is a one-line MoefyError that names the file."""

from __future__ import annotations

import pickle

import pytest
import torch

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.finetune import FinetuneConfig, finetune, relufy_
from moefy.finetune.train import CHECKPOINT_DIR, CHECKPOINT_FILE
from tiny_models import VOCAB, tiny_model

CONFIG = dict(max_steps=4, batch_size=2, reg="prosparse", log_every=1)


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appears if the pickle is trusted."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _blocks() -> TokenBlocks:
    gen = torch.Generator().manual_seed(0)
    return TokenBlocks(torch.randint(3, VOCAB, (8, 16), generator=gen), "random", "calibration")


def _model():
    model = tiny_model("llama")
    relufy_(model)
    return model


def _paused_run(out):
    """A real checkpoint in ``out`` (a run paused after 2 of 4 steps)."""
    finetune(_model(), _blocks(), FinetuneConfig(**CONFIG), out=out, pause_after=2)
    return out / CHECKPOINT_DIR / CHECKPOINT_FILE


def _resume_error(out) -> str:
    with pytest.raises(MoefyError) as info:
        finetune(_model(), _blocks(), FinetuneConfig(**CONFIG), out=out)
    message = str(info.value)
    assert "\n" not in message
    assert str(out / CHECKPOINT_DIR / CHECKPOINT_FILE) in message
    return message


def test_the_payload_really_runs_code_when_trusted(tmp_path):
    # the control: an ordinary unpickle of the payload creates the file, so the tests below
    # would see it if the checkpoint were trusted
    pickle.loads(pickle.dumps(_CreatesFile(str(tmp_path / "control"))))
    assert (tmp_path / "control").exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_crafted_checkpoint_runs_no_code(tmp_path, writer):
    path = _paused_run(tmp_path / "run")
    state = torch.load(path, weights_only=True)
    pwned = tmp_path / "pwned"
    state["config"] = _CreatesFile(str(pwned))
    if writer == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as file:
            pickle.dump(state, file, protocol=2)  # the protocol torch.load expects
    message = _resume_error(tmp_path / "run")
    assert not pwned.exists()
    assert "never unpickles" in message


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a checkpoint at all",
        "truncated",
    ],
)
def test_an_unreadable_checkpoint_is_one_line(tmp_path, content):
    path = _paused_run(tmp_path / "run")
    if content == "truncated":
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    assert "delete it to start afresh" in _resume_error(tmp_path / "run")


@pytest.mark.parametrize(
    "edit",
    [
        lambda state: [1, 2, 3],
        lambda state: {k: v for k, v in state.items() if k != "rng"},
        lambda state: {**state, "config": "max_steps=4"},
        lambda state: {**state, "config": {**state["config"], "lr": "fast"}},
        lambda state: {**state, "model": {"nothing": torch.zeros(1)}},
        lambda state: {**state, "steps": "three"},
    ],
)
def test_a_checkpoint_of_the_wrong_shape_is_one_line(tmp_path, edit):
    path = _paused_run(tmp_path / "run")
    torch.save(edit(torch.load(path, weights_only=True)), path)
    _resume_error(tmp_path / "run")


def test_a_resumed_run_still_reads_its_own_checkpoint(tmp_path):
    path = _paused_run(tmp_path / "run")
    torch.load(path, weights_only=True)  # everything it holds is a tensor or a plain value
    report = finetune(_model(), _blocks(), FinetuneConfig(**CONFIG), out=tmp_path / "run")
    assert report.resumed_from == 2 and report.steps == 4
