"""benchmarks/carve_scale.py on tiny shapes: its figures, its carve, its JSON and its options."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "carve_scale.py"
TINY = ["--d-model", "32", "--d-ff", "128", "--tokens", "96", "--pattern-tokens", "24"]
TINY += ["--chunk", "40", "--expert-size", "8", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def carve_scale() -> ModuleType:
    spec = importlib.util.spec_from_file_location("carve_scale", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_layer_and_layer_by_layer_figures(carve_scale, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        one = carve_scale.main([*TINY, "--parts", "a", "--json", str(tmp_path / "a.json")])
        model = carve_scale.main([*TINY, "--parts", "b", "--layers", "2"])
    finally:
        torch.set_num_threads(threads)
    a = json.loads((tmp_path / "a.json").read_text())["parts"][0]
    assert a == one["parts"][0]
    assert a["experts"] == 128 // 8 and a["shared_experts"] == 2  # round(0.125 * 16)
    assert a["seconds"] == pytest.approx(a["h_s"] + a["stats_s"] + a["cluster_s"])
    assert a["stats_bytes"] == 128 * 4 + 128 * 24 * 4  # rates + (F, T) patterns
    assert a["peak_rss_gib"] > 0
    b = model["parts"][0]
    assert [row["layer"] for row in b["rows"]] == [0, 1]
    assert b["coactivation_bytes_per_layer"] == {"float32": 128**2 * 4, "float64": 128**2 * 8}
    assert b["slot_table_bytes"] == 2 * 128 * 8  # two (E, S) int64 tables


def test_profile_and_carve_of_a_layer(carve_scale) -> None:
    layer = carve_scale.random_layer(16, 64, torch.float32, seed=0)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    seconds: dict[str, float] = {}
    stats = carve_scale.profile_layer(layer, x, pattern_tokens=10, chunk=7, seconds=seconds)
    h = torch.nn.functional.silu(x @ layer.w_gate.T) * (x @ layer.w_up.T)  # (N, F)
    top = h.abs() >= h.abs().topk(7, dim=1).values[:, -1:]  # ceil(0.1 * 64) = 7 per token
    torch.testing.assert_close(stats.rates, top.float().mean(0))
    torch.testing.assert_close(stats.patterns.sum(0), torch.ones(10))  # shares per token
    slots, _method = carve_scale.carve_layer(layer, stats, shared=0.25, expert_size=8, seed=0)
    assert sorted(slots.flatten().tolist()) == list(range(64))
    shared, routed = stats.rates[slots[:2].flatten()], stats.rates[slots[2:].flatten()]
    assert shared.min() >= routed.max()  # 2 shared experts: the highest rates


def test_conversion_skips_cleanly_without_its_pieces(carve_scale, monkeypatch) -> None:
    monkeypatch.setattr(carve_scale, "_convert_missing", lambda: "not in this moefy yet: x")
    result = carve_scale.part_c(carve_scale.parse_args(["--parts", "c"]))
    assert result == {"part": "c", "skipped": "not in this moefy yet: x"}
    assert "skipped: not in this moefy yet" in carve_scale._table([result])


@pytest.mark.parametrize(
    "argv", [["--parts", "d"], ["--shared", "1"], ["--d-ff", "0"], ["--parts", ""]]
)
def test_bad_options_are_refused(carve_scale, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        carve_scale.parse_args(argv)


def test_children_get_the_options_minus_parts_and_json(carve_scale) -> None:
    argv = ["--parts", "a,b", "--layers", "4", "--json=x.json", "--d-ff", "64"]
    assert carve_scale._without(argv, ("--parts", "--json")) == ["--layers", "4", "--d-ff", "64"]
