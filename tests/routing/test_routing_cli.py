"""``moefy train-routers`` end to end on a tiny moefied folder."""

from __future__ import annotations

import json

import pytest
import torch

from moefy.cli.main import main
from moefy.models.load import load_model
from moefy.moe import moe_layers
from moefy.routing import MLPRouter
from moefy.routing.routers import ROUTERS
from tiny_models import WORDS, save_tiny_hf_folder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: one thread avoids oversubscription on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_routers_cli(tmp_path, capsys, monkeypatch):
    from moefy.cli import main as cli

    monkeypatch.setitem(cli.COMMANDS, "train-routers", "moefy.cli.routers_cmd")
    model_dir = save_tiny_hf_folder(tmp_path / "tiny")
    gen = torch.Generator().manual_seed(0)
    docs = [
        {"text": " ".join(WORDS[i] for i in torch.randint(len(WORDS), (60,), generator=gen))}
        for _ in range(40)
    ]
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps(d) for d in docs))
    moe_dir = tmp_path / "moe"
    assert (
        main(["convert", "--model", str(model_dir), "--experts", "8", "--out", str(moe_dir)]) == 0
    )
    results = tmp_path / "results.json"
    argv = [
        "train-routers", "--model", str(moe_dir), "--data", str(text), "--block-len", "16",
        "--tokens", "256", "--epochs", "3", "--hidden", "16", "--out", str(tmp_path / "routed"),
        "--eval-tokens", "64", "--fractions", "0.5,0.25", "--taus", "0.9", "--results",
        str(results),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mlp routers on 256 tokens" in out and "router_report.json written to" in out
    report = json.loads((tmp_path / "routed" / "router_report.json").read_text())
    assert report["n_tokens"] == 256 and len(report["layers"]) == 2
    assert report["config"]["loss"] == "listwise" and report["config"]["hidden"] == 16
    model, _ = load_model(tmp_path / "routed")
    assert all(type(m.selector) is MLPRouter for m in moe_layers(model))
    rows = json.loads(results.read_text())
    assert [(r["family"], r["method"], r["level"]) for r in rows] == [
        ("moe-router", "mlp-top50", 0.5),
        ("moe-router", "mlp-top25", 0.25),
        ("moe-router", "mlp-dyn90", 0.9),
    ]
    assert rows[0]["active_fraction"] == 0.5 and 0 < rows[2]["active_fraction"] <= 1
    assert all(r["ppl_ratio"] > 0 and 0 <= r["recall"] <= 1 for r in rows)


def test_bad_tau_is_one_line_error(tmp_path, capsys, monkeypatch):
    from moefy.cli import main as cli

    monkeypatch.setitem(cli.COMMANDS, "train-routers", "moefy.cli.routers_cmd")
    out = str(tmp_path / "out")
    assert main(["train-routers", "--model", str(tmp_path), "--taus", "1.5", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "must lie in (0, 1]" in err and len(err.strip().splitlines()) == 1
    assert "mlp" in ROUTERS
