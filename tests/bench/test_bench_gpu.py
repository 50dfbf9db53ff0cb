"""The GPU benchmark's arithmetic, shapes and tables, checked without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from moefy.bench import gpu
from moefy.bench.report import Table, cpu_report
from moefy.cli.show import print_report
from moefy.errors import MoefyError


def test_shapes_are_the_issues_llama_projections():
    pairs = {(s.n_in, s.n_out) for s in gpu.LINEAR_SHAPES}
    assert pairs == {(4096, 14336), (14336, 4096), (4096, 4096), (8192, 28672), (28672, 8192)}
    assert gpu.BATCHES == (1, 4, 16)
    # the issue's levels and 0.75 (its goal for the expert blocks: 25 % of experts)
    assert gpu.SPARSITIES == (0.0, 0.25, 0.40, 0.50, 0.65, 0.75, 0.80, 0.90)
    mlp = gpu.MLP_SHAPES[0]
    assert mlp.expert_size * mlp.num_experts == mlp.d_ff == 14336


def test_byte_counts():
    shape = gpu.WeightShape("s", 4096, 14336)
    assert shape.weight_bytes(2) == 4096 * 14336 * 2
    # all rows read, plus x (N, I) and y (N, O)
    assert gpu.linear_bytes(shape, 1, 4096, 2) == shape.weight_bytes(2) + (4096 + 14336) * 2
    assert gpu.linear_bytes(shape, 4, 2048, 2) == (2048 * 14336 + 4 * (4096 + 14336)) * 2
    mlp = gpu.MLPShape("m", 4096, 14336, 64)
    assert mlp.expert_bytes(2) * 64 == mlp.dense_bytes(2)
    assert gpu.mlp_bytes(mlp, 2, 16, 2) == mlp.dense_bytes(2) // 4 + 2 * 2 * 4096 * 2
    # TEAL MLP: every input and activation kept reads the whole block, like dense
    assert gpu.teal_mlp_bytes(mlp, 2, 4096, 14336, 2) == mlp.dense_bytes(2) + 2 * 2 * 4096 * 2
    assert gpu.teal_mlp_bytes(mlp, 1, 2048, 0, 2) == (2048 * 2 * 14336 + 2 * 4096) * 2


def test_copies_span_several_l2_caches():
    l2 = 50 * 2**20
    small = 4096 * 4096 * 2
    copies = gpu.copies_for(small, l2)
    assert copies * small >= gpu.L2_MULTIPLE * l2 > (copies - 1) * small
    assert gpu.copies_for(28672 * 8192 * 2, l2) == 2  # never fewer than two


def test_kept_rows_follow_the_kernel_rule():
    x = torch.tensor([[0.0, 0.5, -0.2, 0.1], [0.0, -0.05, 0.3, 0.1]])
    assert gpu.kept_rows(x, torch.tensor(0.1)) == 2  # columns 1 and 2; |0.1| <= 0.1 dropped
    assert gpu.kept_rows(x, torch.tensor(0.0)) == 3  # exact zeros are never read


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_sparsity_threshold_drops_that_share(sparsity):
    x = torch.randn(4, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    thr = gpu.sparsity_threshold(x, sparsity)
    dropped = float((x.abs() <= thr).float().mean())
    assert thr.dtype == x.dtype and abs(dropped - sparsity) < 0.01


def test_experts_per_token():
    assert [gpu.experts_per_token(64, s) for s in (0.0, 0.5, 0.75, 0.9)] == [64, 32, 16, 6]
    assert gpu.experts_per_token(4, 0.99) == 1


def test_limit_math():
    row = gpu.result_row(
        shape="s",
        batch=1,
        method="teal",
        sparsity=0.5,
        dense_seconds=40e-6,
        sparse_seconds=25e-6,
        sparse_bytes=60_000_000,
        dense_bytes=120_000_000,
        bandwidth=3e12,
    )
    assert row["active"] == 0.5
    assert row["speedup"] == pytest.approx(1.6)
    assert row["limit_speedup"] == pytest.approx(2.0)  # 40 us over 60 MB / 3 TB/s = 20 us
    assert row["of_bandwidth"] == pytest.approx(0.8)
    assert row["dense_of_bandwidth"] == pytest.approx(1.0)


def _results():
    rows = [
        gpu.result_row(
            shape="llama3-8b up 4096->14336",
            batch=b,
            method="teal",
            sparsity=s,
            dense_seconds=41.4e-6,
            sparse_seconds=41.4e-6 * (1 - s) + 2e-6,
            sparse_bytes=int(117e6 * (1 - s)) + 1,
            dense_bytes=int(117e6),
            bandwidth=2.93e12,
        )
        for b in (1, 4)
        for s in (0.0, 0.5)
    ]
    return {
        "config": gpu.GpuBenchConfig().to_dict(),
        "machine_before": {"gpu": "H100", "load_average": None},
        "machine_after": {"load_average": None},
        "kernels": "triton",
        "bandwidth_gbps": {"cuda:0": 2930.0},
        "ffn": rows,
        "decode": [],
    }


def test_tables_and_json(capsys):
    results = _results()
    table = gpu.table_rows(results)
    assert [r["sparsity"] for r in table] == ["0%", "50%", "0%", "50%"]
    assert table[1]["dense us"] == "41.4" and table[1]["speedup"].endswith("x")
    assert json.loads(json.dumps(results))["ffn"] == results["ffn"]  # JSON-ready
    report = gpu.gpu_report(results)
    assert report[0] == "kernels: triton on H100; copy bandwidth: cuda:0 2930 GB/s"
    assert isinstance(report[1], Table) and report[1].rows == table
    print_report(report)
    print_report(cpu_report(results))  # the CPU bench's report takes the same layout
    printed = capsys.readouterr().out
    assert "H100" in printed and "2930 GB/s" in printed and "teal" in printed


def test_config_validation():
    assert gpu.GpuBenchConfig(quick=True).rounds_or_default() == 10
    assert gpu.GpuBenchConfig().torch_dtype() is torch.bfloat16
    for bad in (
        {"batches": (0,)},
        {"batches": (17,)},
        {"sparsities": (1.0,)},
        {"dtype": "int8"},
        {"rounds": 0},
        {"linear": False, "mlp": False},
        {"version": 99},
    ):
        with pytest.raises(MoefyError):
            gpu.GpuBenchConfig(**bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_is_a_clear_error():
    with pytest.raises(MoefyError, match="needs a CUDA device"):
        gpu.run_gpu_bench(gpu.GpuBenchConfig(quick=True))


def test_measurement_glue_on_tiny_shapes(monkeypatch):
    """The GPU-only loops, run on CPU tensors under Triton's interpreter with fake timing."""
    pytest.importorskip("triton")
    from moefy.kernels.triton_launch import interpreter_active

    if not interpreter_active():
        pytest.skip("triton was imported without TRITON_INTERPRET=1")
    monkeypatch.setattr(gpu, "LINEAR_SHAPES", (gpu.WeightShape("tiny", 40, 24),))
    monkeypatch.setattr(gpu, "MLP_SHAPES", (gpu.MLPShape("tiny mlp", 32, 64, 4),))
    monkeypatch.setattr(gpu, "_graphed", lambda calls: lambda: [call() for call in calls])

    def fake_medians(variants, *, rounds, calls):
        for variant in variants.values():
            variant()
        return {name: (2e-6 if name == "dense" else 1e-6) for name in variants}

    monkeypatch.setattr(gpu, "_event_medians", fake_medians)
    config = gpu.GpuBenchConfig(batches=(1, 3), sparsities=(0.0, 0.5), calls_per_graph=3)
    cpu = torch.device("cpu")
    rows = gpu._linear_rows(config, cpu, 1e9, 4096, lambda _m: None)
    rows += gpu._mlp_rows(config, cpu, 1e9, 4096, lambda _m: None)
    linear = [("teal", batch, active) for batch in (1, 3) for active in (1.0, 0.5)]
    mlp = [
        (method, batch, active)
        for batch in (1, 3)
        for method in ("experts", "teal")
        for active in (1.0, 0.5)
    ]
    assert [(r["method"], r["batch"], r["active"]) for r in rows] == linear + mlp
    assert all(r["speedup"] == pytest.approx(2.0) for r in rows)
    dense_linear = gpu.linear_bytes(gpu.LINEAR_SHAPES[0], 1, 40, 2)
    assert rows[0]["sparse_mb"] * 1e6 <= dense_linear  # no more rows than the weight has
    assert rows[1]["sparse_mb"] < rows[0]["sparse_mb"]  # 50 % sparsity reads fewer rows
    teal_mlp = {(r["batch"], r["active"]): r for r in rows if r["shape"] == "tiny mlp"}
    teal_mlp = {k: r for k, r in teal_mlp.items() if r["method"] == "teal"}
    mlp_shape = gpu.MLP_SHAPES[0]
    # at 0 % every weight row is read but those of exact zeros (random bf16 tokens can hold
    # one): about the dense block's bytes; at 50 % fewer
    whole = gpu.teal_mlp_bytes(mlp_shape, 1, 32, 64, 2)
    assert 0.9 * whole < teal_mlp[1, 1.0]["sparse_mb"] * 1e6 <= whole
    assert teal_mlp[1, 0.5]["sparse_mb"] < teal_mlp[1, 1.0]["sparse_mb"]


def test_threshold_mlp_at_zero_threshold_is_the_dense_mlp():
    """The TEAL MLP variant's glue (transposed weights, gate/up order, activation) is dense at
    threshold 0, checked on CPU tensors under Triton's interpreter."""
    pytest.importorskip("triton")
    from moefy.kernels.triton_launch import interpreter_active

    if not interpreter_active():
        pytest.skip("triton was imported without TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(0)
    D, F = 24, 40
    dense = [tuple(torch.randn(*size, generator=gen) for size in ((F, D), (F, D), (D, F)))]
    teal = [tuple(w.t().contiguous() for w in dense[0])]
    x = torch.randn(3, D, generator=gen)
    zero = torch.zeros(())
    got = gpu._threshold_mlp(x, teal, zero, zero, 0)
    torch.testing.assert_close(got, gpu._dense_mlp(x, dense, 0), rtol=1e-4, atol=1e-4)
