"""The end-to-end decode benchmark's logic on a tiny random model on the CPU (its figures are
GPU figures; here: variants, thresholds swapped per target, rows, errors)."""

from __future__ import annotations

import pytest
import torch

from moefy.bench.gpu_decode import DecodeBenchConfig, random_model, run_decode_bench
from moefy.errors import MoefyError
from moefy.kernels import use_backend


def test_decode_bench_rows_on_a_tiny_random_model():
    config = DecodeBenchConfig(shape="tiny", dtype="fp32", new_tokens=3, rounds=1, compile=False)
    with use_backend("cpu"):
        results = run_decode_bench(config, device=torch.device("cpu"))
    rows = {(row["variant"], row["active"]): row for row in results["decode"]}
    assert set(rows) == {
        ("dense", 1.0),
        ("teal", 0.6),
        ("teal", 0.5),
        ("experts", 0.5),
        ("experts", 0.25),
    }
    assert "random weights" in results["note"]
    assert rows[("dense", 1.0)]["speedup"] == pytest.approx(1.0)
    # each variant's thresholds or top-k were in force when its shares were measured
    mb = {key: row["mb_per_token"] for key, row in rows.items()}
    assert mb[("teal", 0.5)] < mb[("teal", 0.6)] < mb[("dense", 1.0)]
    assert mb[("experts", 0.25)] < mb[("experts", 0.5)] < mb[("dense", 1.0)]
    assert all(row["tokens_per_s"] > 0 for row in rows.values())


def test_random_model_has_the_shape_asked():
    model = random_model(
        DecodeBenchConfig(shape="tiny", layers=3, dtype="bf16"), torch.device("cpu")
    )
    assert model.config.num_hidden_layers == 3
    assert next(model.parameters()).dtype is torch.bfloat16
    assert not model.training


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"shape": "llama9"}, "unknown model shape"),
        ({"dtype": "int8"}, "dtype must be"),
        ({"teal_sparsities": (1.0,)}, "TEAL sparsities"),
        ({"expert_fractions": (0.0,)}, "expert fractions"),
        ({"new_tokens": 1}, "new_tokens"),
        ({"layers": 0}, "layers"),
    ],
)
def test_bad_configs_are_one_line_errors(fields, pattern):
    with pytest.raises(MoefyError, match=pattern):
        DecodeBenchConfig(**fields)
