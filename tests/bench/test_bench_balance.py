"""The bench's balance table: the union of experts a decode batch reads, plain and balanced."""

from __future__ import annotations

import pytest

from moefy.bench.balance import run_balance_bench
from moefy.bench.report import Table, cpu_report
from moefy.bench.run import PARTS, BenchConfig
from tiny_models import save_tiny_hf_folder, write_word_text


def test_balance_rows_on_a_tiny_model(tmp_path) -> None:
    model = save_tiny_hf_folder(tmp_path / "tiny")
    text = write_word_text(tmp_path / "text.jsonl", docs=200)
    rows = run_balance_bench(str(model), str(text), 0.25, tokens=256)
    assert [(r["variant"], r["batch"]) for r in rows] == [
        (variant, b) for variant in ("top-k", "top-k + balancing") for b in (1, 4, 16)
    ]
    plain, balanced = rows[:3], rows[3:]
    for variant in (plain, balanced):
        assert variant[0]["read"] == pytest.approx(0.25)  # one token: its k of E experts
        reads = [r["read"] for r in variant]
        assert reads == sorted(reads) and reads[-1] <= 1.0
    assert balanced[0]["imbalance"] <= plain[0]["imbalance"]
    assert rows[0]["experts"] == 4  # d_ff 64 in experts of 16
    tables = [item for item in cpu_report(_results(rows)) if isinstance(item, Table)]
    assert [t.title.split(":")[0] for t in tables] == ["balance"]
    assert tables[0].rows[0] == {
        "variant": "top-k",
        "B": 1,
        "read": "25.0%",
        "imbalance": f"{rows[0]['imbalance']:.2f}",
    }


def _results(rows) -> dict:
    return {
        "machine_before": {},
        "kernels": "cpu",
        "bandwidth_gbps": {},
        "ffn": [],
        "decode": [],
        "balance": rows,
    }


def test_the_cli_offers_every_bench_part() -> None:
    from moefy.cli import bench_cmd

    assert bench_cmd.BENCH_PARTS == PARTS
    assert BenchConfig(parts=("balance",)).parts == ("balance",)
