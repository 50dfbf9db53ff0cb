"""``moefy generate`` on a saved moefied tiny model, and the one-line errors of generate/bench."""

from __future__ import annotations

import re

import pytest
import torch

from moefy.cli.main import main
from moefy.moe import MoEfyConfig, moefy_, save
from moefy.routing import attach_routers
from tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture
def routed_folder(tmp_path):
    model = tiny_model("llama")
    model.config.pad_token_id = 0
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    attach_routers(model, "centroid", fraction=0.25)
    return save(model, tmp_path / "moe-routed", tokenizer=tiny_tokenizer())


def _generate(folder, capsys, *options):
    """Exit code, printed text and its table rows by name of ``moefy generate`` on ``folder``."""
    argv = ["generate", "--model", str(folder), "--prompt", "the market", *options]
    code = main(argv)
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    return code, out, rows


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_generate_prints_dense_and_sparse_speed(routed_folder, capsys, device):
    backend = "cpu" if device == "cpu" else "auto"  # auto: Triton on CUDA
    options = ["--max-new-tokens", "4", "--backend", backend, "--device", device]
    code, out, rows = _generate(routed_folder, capsys, *options)
    assert code == 0
    assert out.startswith("the market")
    assert {"dense", "sparse"} <= set(rows)
    # the sparse model reads fewer weight bytes per token than the dense one
    dense_mb, sparse_mb = (float(rows[k].split("│")[4]) for k in ("dense", "sparse"))
    assert sparse_mb < dense_mb


@pytest.mark.gpu
@needs_cuda
def test_generate_compiled_on_cuda_prints_dense_and_sparse_speed(routed_folder, capsys):
    options = ["--max-new-tokens", "8", "--device", "cuda", "--dtype", "bf16", "--compile"]
    code, out, rows = _generate(routed_folder, capsys, *options)
    assert code == 0 and out.startswith("the market")
    assert {"dense", "sparse"} <= set(rows)


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["generate", "--model", "x", "--prompt", "p", "--max-new-tokens", "1"], "at least 2"),
        (["generate", "--model", "x", "--prompt", "p", "--backend", "fast"], "invalid choice"),
        (["bench", "--threads", "0"], "thread counts must be >= 1"),
        (["bench", "--only", "both"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, pattern, capsys):
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(pattern, err)
    assert len(err.strip().splitlines()) == 1


def test_generate_compiled_prints_dense_and_sparse_speed(routed_folder, capsys):
    code, out, rows = _generate(routed_folder, capsys, "--max-new-tokens", "3", "--compile")
    assert code == 0
    assert "compiled static-cache step" in out
    assert {"dense", "sparse"} <= set(rows)
