"""The GPU goal table over GPU bench results: met, short, not measured."""

from __future__ import annotations

import json

from moefy.bench import gpu
from moefy.bench.gpu_goals import GOALS, MLP, UP, check_goals, main


def _kernel_row(shape, method, sparsity, speedup, limit=None):
    dense = 4e-5
    row = gpu.result_row(
        shape=shape, batch=1, method=method, sparsity=sparsity, dense_seconds=dense,
        sparse_seconds=dense / speedup, sparse_bytes=1, dense_bytes=2, bandwidth=1.0,
    )  # fmt: skip
    if limit is not None:
        row["limit_speedup"] = limit
    return row


def test_goals_are_read_from_the_matching_rows():
    kernels = {
        "ffn": [
            _kernel_row(UP, "teal", 0.5, 1.95, limit=2.1),  # 1.95x, 93 % of the limit
            _kernel_row(UP, "teal", 0.9, 4.0),  # short of 5x
            _kernel_row(UP, "teal", 0.5, 9.9) | {"batch": 4},  # another batch: ignored
            _kernel_row(MLP, "experts", 0.75, 3.3),
        ]
    }
    decode = {"decode": [{"variant": "teal", "active": 0.5, "speedup": 1.5}]}
    rows = {row["goal"]: row for row in check_goals(kernels, decode)}
    assert len(rows) == len(GOALS)
    assert rows[f"{UP}, 50 %"]["status"] == "met" and rows[f"{UP}, 50 %"]["measured"] == 1.95
    limit = rows[f"{UP}, 50 %, of limit"]
    assert limit["status"] == "met" and abs(limit["measured"] - 1.95 / 2.1) < 1e-9
    assert rows[f"{UP}, 90 %"]["status"] == "short"
    assert rows[f"{UP}, 0 %"]["status"] == "not measured"
    assert rows["Llama-3-8B MLP block, 25 % of experts"]["status"] == "met"
    assert rows["Llama-3-8B MLP block, TEAL 50 %"]["status"] == "not measured"
    assert rows["Llama-3-8B-shaped decode, TEAL 50 %"]["status"] == "short"


def test_cli_prints_one_line_per_goal(tmp_path, capsys):
    (tmp_path / "kernels.json").write_text(
        json.dumps({"ffn": [_kernel_row(MLP, "teal", 0.5, 2.4)]})
    )
    assert main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(GOALS)
    assert any(line.split()[0] == "met" and "MLP block, TEAL 50 %: 2.40" in line for line in lines)
    assert sum(line.split()[0] == "met" for line in lines) == 1
    assert main([]) == 2
