"""The engines themselves, on a small random Qwen2-MoE (the layout `moefy export` writes) and on
what `moefy export` itself writes from a carved random Llama (every expert running, so the
engines must give the dense model's tokens: no routing boundary for rounding to move).

Each test runs only where its engine's venv is installed (``serving/setup_venvs.sh``); elsewhere
it is skipped with the command that installs it. The dense comparison is left to
``make test-serving``: here only the model's greedy tokens and log-probabilities are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from serving_scripts import CHECK_SCRIPT, ENGINE_VENVS, SERVING, engine_python

from moefy.models.load import SMOLLM2, cache_dir, load_model

pytestmark = pytest.mark.slow
# float32 weights in both; the engines sum in other orders than torch, and llama.cpp keeps its
# KV cache in float16 by default (measured: 2.1e-3 on the random Qwen2-MoE, vLLM 4e-6)
LOGPROB_TOLERANCE = 1e-2
TOKENS = 16


def _needs(engine: str):
    """Skip a test unless ``engine``'s venv is installed (decided before any fixture runs)."""
    return pytest.mark.skipif(
        engine_python(engine) is None,
        reason=f"{ENGINE_VENVS[engine].name} is not installed: run serving/setup_venvs.sh {engine}",
    )


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A random Qwen2-MoE folder with SmolLM2's tokenizer."""
    load_model(SMOLLM2)  # makes sure the converted SmolLM2 folder (its tokenizer) exists
    out = tmp_path_factory.mktemp("serving") / "tiny-qwen2moe"
    builder = SERVING / "tiny_qwen2moe.py"
    tokenizer = cache_dir() / "models" / SMOLLM2
    subprocess.run(
        [sys.executable, str(builder), "--tokenizer", str(tokenizer), "--out", str(out)], check=True
    )
    return out


@pytest.fixture(scope="module")
def moefy_export(tmp_path_factory):
    """(hf folder, f32 GGUF) that ``moefy export`` writes from a carved random Llama with
    SmolLM2's vocabulary: a shared expert (its zero gate, which llama.cpp once turned into NaN)
    and 6 routed experts, all of them running."""
    import torch
    import transformers as T

    import moefy
    from moefy.carve import CarveConfig, carve_
    from moefy.data.blocks import TokenBlocks

    load_model(SMOLLM2)
    tokenizer = T.AutoTokenizer.from_pretrained(cache_dir() / "models" / SMOLLM2)
    config = T.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,  # head_dim 32: vLLM's CPU attention refuses 16
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,  # clear greedy margins, as in tiny_qwen2moe.py
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, len(tokenizer), (16, 32), generator=torch.Generator().manual_seed(1))
    carve_(model, TokenBlocks(ids), CarveConfig(expert_size=32, shared=0.25, pattern_tokens=64))
    out = tmp_path_factory.mktemp("moefy-export")
    moefy.export(model, out / "hf", tokenizer=tokenizer)
    moefy.export(model, out / "moe.gguf", format="gguf", tokenizer=tokenizer)
    return out / "hf", out / "moe.gguf"


def _check(python, engine, model, out, *extra):
    result = subprocess.run(
        [
            str(python),
            str(CHECK_SCRIPT),
            "--tokens",
            str(TOKENS),
            "--engine",
            engine,
            "--model",
            str(model),
            "--out",
            str(out),
            "--reference-python",
            sys.executable,
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    summary_file = out / f"{engine}.json"
    assert summary_file.exists(), result.stdout[-2000:] + result.stderr[-2000:]
    return result, json.loads(summary_file.read_text())


def _assert_matches(result, summary):
    check = summary["checks"]["model"]
    assert check["prompts"] == 5 and check["greedy_match"], result.stdout[-2000:]
    assert check["max_abs_logprob_diff"] < LOGPROB_TOLERANCE
    assert summary["tokens_per_second"]["model"]["sequential"] > 0
    assert result.returncode == 0


@_needs("vllm")
def test_vllm_reproduces_transformers_greedy(tiny_moe, tmp_path):
    _assert_matches(*_check(engine_python("vllm"), "vllm", tiny_moe, tmp_path))


@_needs("llamacpp")
def test_llamacpp_reproduces_transformers_greedy(tiny_moe, tmp_path):
    python = engine_python("llamacpp")
    gguf = tmp_path / "tiny.gguf"
    subprocess.run([str(SERVING / "hf_to_gguf.sh"), str(tiny_moe), str(gguf), "f32"], check=True)
    _assert_matches(*_check(python, "llamacpp", tiny_moe, tmp_path, "--engine-model", str(gguf)))


@_needs("vllm")
def test_vllm_runs_moefys_export_as_transformers_does(moefy_export, tmp_path):
    folder, _ = moefy_export
    _assert_matches(*_check(engine_python("vllm"), "vllm", folder, tmp_path))


@_needs("llamacpp")
def test_llamacpp_runs_moefys_gguf_as_transformers_does(moefy_export, tmp_path):
    folder, gguf = moefy_export
    python = engine_python("llamacpp")
    _assert_matches(*_check(python, "llamacpp", folder, tmp_path, "--engine-model", str(gguf)))
