"""The expert-size section of ``moefy bench``: its rows on a tiny shape, and that every expert
size it times computes the same FFN as the reference kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

from moefy.bench import expert_size
from moefy.bench.report import Table, cpu_report
from moefy.errors import MoefyError
from moefy.kernels import Backend, kernel_fits, reference
from moefy.kernels.backend import cpu_extension

D, F = 32, 64
SIZES = (8, 16, 32)
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}

needs_cpu_kernels = pytest.mark.skipif(cpu_extension() is None, reason="C++ kernels not built")


def _dense(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
    return Fn.linear(Fn.silu(Fn.linear(x, gate)) * Fn.linear(x, up), down)


@needs_cpu_kernels
def test_rows_cover_every_size_keep_and_path() -> None:
    rows = expert_size.run_expert_size_bench(
        threads=1, rounds=1, d_model=D, d_ff=F, expert_sizes=SIZES, keeps=(0.25, 0.5),
        batches=(1, 20), copies=2,
    )  # fmt: skip
    seen = {(r["batch"], r["expert_size"], r["keep"], r["path"]) for r in rows}
    expected = {(1, s, k, "kernel") for s in SIZES for k in (0.25, 0.5)}
    expected |= {(20, s, k, p) for s in SIZES for k in (0.25, 0.5) for p in ("kernel", "grouped")}
    assert seen == expected
    for row in rows:
        assert row["experts"] == F // row["expert_size"]
        assert row["tokens_per_s"] > 0 and row["dense_tokens_per_s"] > 0
        assert row["vs_dense"] == pytest.approx(row["tokens_per_s"] / row["dense_tokens_per_s"])
        assert 0 < row["union"] <= 1
    results = {"machine_before": {}, "kernels": "cpu", "bandwidth_gbps": {}, "ffn": [],
               "decode": [], "expert_size": rows}  # fmt: skip
    tables = [item for item in cpu_report(results) if isinstance(item, Table)]
    assert len(tables) == 1 and len(tables[0].rows) == len(rows)


@needs_cpu_kernels
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [1, 20])
def test_kernel_and_grouped_paths_equal_reference(size: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(size)
    gate, up = torch.randn(F, D, generator=gen), torch.randn(F, D, generator=gen)
    down = torch.randn(D, F, generator=gen)
    x = torch.randn(batch, D, generator=gen)
    w_in, w_out = expert_size.expert_weights(gate, up, down, size)
    mask = expert_size.random_selection(batch, F // size, 0.5, gen)  # (N, E)
    assert kernel_fits("expert_ffn", x[:1], w_in, w_out, extras=(mask,), backend="cpu") is (
        Backend.CPU
    )
    want = reference.expert_ffn(x, mask, w_in, w_out, None, None, "silu", True)
    with torch.inference_mode():
        kernel = expert_size.kernel_call(x, mask, [(w_in, w_out)])()
        grouped = expert_size.grouped_call(x, mask, [(w_in, w_out)])()
    torch.testing.assert_close(kernel, want, **TOLERANCE)
    torch.testing.assert_close(grouped, want, **TOLERANCE)
    everything = torch.ones_like(mask)  # every expert: the dense FFN
    torch.testing.assert_close(
        reference.expert_ffn(x, everything, w_in, w_out, None, None, "silu", True),
        _dense(x, gate, up, down),
        **TOLERANCE,
    )


def test_selection_keeps_the_share_per_token() -> None:
    mask = expert_size.random_selection(7, 16, 0.25, torch.Generator().manual_seed(0))
    assert mask.sum(dim=1).tolist() == [4] * 7


@pytest.mark.parametrize(
    "kwargs", [{"expert_sizes": (7,)}, {"expert_sizes": (0,)}, {"keeps": (0.0,)}]
)
def test_bad_sizes_and_keeps_are_refused(kwargs: dict) -> None:
    with pytest.raises(MoefyError):
        expert_size.run_expert_size_bench(threads=1, rounds=1, d_model=D, d_ff=F, **kwargs)
