"""serving/check.py: the transformers reference record and the command line (always run)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from serving_scripts import CHECK_SCRIPT, load_compare
from transformers import AutoModelForCausalLM

from tiny_models import save_tiny_hf_folder

TOKENS = 6


def _run(*args):
    return subprocess.run(
        [sys.executable, str(CHECK_SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_reference_step_is_greedy_and_its_logprobs_match_a_full_forward(tmp_path):
    folder = save_tiny_hf_folder(tmp_path / "tiny", "llama")
    out = tmp_path / "reference.json"
    # --tokens after the step's name wins over the one before it
    result = _run("--tokens", 2, "reference", "--model", folder, "--out", out, "--tokens", TOKENS)
    assert result.returncode == 0, result.stderr
    record = load_compare().read_record(out)
    assert len(record["prompts"]) == 5 and record["engine"] == "transformers"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt in record["prompts"]:
        ids = prompt["prompt_ids"] + prompt["tokens"]
        assert len(prompt["tokens"]) == TOKENS
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V)
        steps = logits[len(prompt["prompt_ids"]) - 1 : -1]  # (TOKENS, V): predicts each token
        chosen = torch.tensor(prompt["tokens"])
        assert torch.equal(steps.argmax(-1), chosen)
        logprobs = steps.log_softmax(-1).gather(-1, chosen[:, None])[:, 0]
        # the record's figures come from float32 logits of the cached, token-by-token decode;
        # this full forward rounds in another order: float32 tolerances, not float64 ones
        fp32 = {"rtol": 1.3e-6, "atol": 1e-5}
        expected = torch.tensor(prompt["logprobs"], dtype=torch.double)
        torch.testing.assert_close(logprobs, expected, **fp32)
        top2 = steps.topk(2).values
        margins = torch.tensor(prompt["margins"], dtype=torch.double)
        torch.testing.assert_close(top2[:, 0] - top2[:, 1], margins, **fp32)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--engine", "vllm", "--out", "x"], "--engine, --model and --out are needed"),
        (["--engine", "llamacpp", "--model", "m", "--out", "x"], "give --engine-model"),
        (["--tokens", "0", "reference", "--model", "m", "--out", "x"], "at least 1"),
        (["--engine", "sglang", "--model", "m", "--out", "x"], "invalid choice"),
    ],
)
def test_bad_command_lines_exit_2_with_a_reason(args, message):
    result = _run(*args)
    assert result.returncode == 2 and message in result.stderr


def test_a_failing_step_is_reported_in_one_line(tmp_path):
    result = _run(
        "--engine",
        "vllm",
        "--model",
        tmp_path / "missing",
        "--out",
        tmp_path / "out",
        "--reference-python",
        "/bin/false",
    )
    assert result.returncode == 2
    assert "error: step failed with exit status" in result.stderr.splitlines()[-1]
