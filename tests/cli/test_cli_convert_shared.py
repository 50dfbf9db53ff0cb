"""``moefy convert`` with shared experts and a router fitted after the split, on a tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moefy.arch import find_ffns
from moefy.cli.main import build_parser, main
from moefy.models.load import load_model
from moefy.moe import SPLIT_METHODS, moe_layers, register_split_method
from moefy.moe.convert import model_fingerprint
from moefy.profiling import SparsityProfile
from tiny_models import save_tiny_hf_folder, write_word_text

E, NS = 8, 2  # the tiny model's d_ff = 64: 8 experts of 8 neurons, 2 shared at --shared 0.25


class _RatesProfile:
    """What convert reads of a profile with activation rates, for a model's FFNs."""

    def __init__(self, model) -> None:
        sites = find_ffns(model)
        gen = torch.Generator().manual_seed(0)
        self.fingerprint = model_fingerprint(model, sites)
        self.config = SimpleNamespace(top_share=0.1)
        self.rates = [torch.rand(site.weights().d_ff, generator=gen) for site in sites]

    def activation_rate(self, i: int) -> torch.Tensor:
        return self.rates[i].clone()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert-shared")
    return root, save_tiny_hf_folder(root / "tiny"), write_word_text(root / "text.jsonl")


def _one_line_error(code: int, err: str, *patterns: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "error:" in lines[0], err
    assert all(p in lines[0] for p in patterns), lines[0]


def test_convert_shared_with_a_router(workspace, monkeypatch, capsys) -> None:
    root, model_dir, text = workspace
    dense, _ = load_model(model_dir)
    profile = _RatesProfile(dense)
    monkeypatch.setattr(SparsityProfile, "load", staticmethod(lambda path: profile))
    argv = ["convert", "--model", str(model_dir), "--experts", str(E), "--shared", "0.25"]
    argv += ["--profile", str(root / "profile"), "--router", "centroid", "--data", str(text)]
    argv += ["--tokens", "64", "--block-len", "16", "--out", str(root / "moe")]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table's title may wrap
    assert "4 shared experts in all" in out and "shared ┃" in out
    assert "│ 0 │ 8 │ 2 │ 8 │ 64 │" in out  # layer, experts, shared, size, neurons
    assert "centroid routers fitted on 64 tokens" in out
    model, _ = load_model(root / "moe")
    layers = moe_layers(model)
    assert [moe.num_shared for moe in layers] == [NS, NS]
    assert all(moe.selector.selector_type == "centroid" for moe in layers)
    for moe in layers:
        top = torch.argsort(profile.rates[moe.layer_index], descending=True)[: NS * 8]
        assert set(moe.perm[:NS].flatten().tolist()) == set(top.tolist())
    ids = torch.randint(3, 30, (1, 10))
    with torch.no_grad():  # every expert runs until a budget is set
        torch.testing.assert_close(model(ids).logits, dense(ids).logits)


def test_convert_shared_from_a_real_profile(workspace, capsys) -> None:
    root, model_dir, text = workspace
    common = ["--model", str(model_dir), "--data", str(text), "--block-len", "16"]
    profile_dir = root / "real-profile"
    assert main(["profile", *common, "--tokens", "128", "--out", str(profile_dir)]) == 0
    argv = ["convert", "--model", str(model_dir), "--experts", str(E), "--shared", "0.25"]
    assert main([*argv, "--profile", str(profile_dir), "--out", str(root / "moe-real")]) == 0
    capsys.readouterr()
    profile = SparsityProfile.load(profile_dir)
    model, _ = load_model(root / "moe-real")
    for moe in moe_layers(model):
        rates = profile.activation_rate(moe.layer_index)
        shared = moe.perm[:NS].flatten()
        routed = moe.perm[NS:].flatten()
        assert float(rates[shared].min()) >= float(rates[routed[routed >= 0]].max())


@pytest.mark.parametrize(
    ("extra", "patterns"),
    [
        (("--shared", "0.25"), ("--shared", "--profile")),
        (("--shared-rule", "profile"), ("--profile",)),
        (("--router", "telepathy"), ("--router", "telepathy", "centroid")),
    ],
)
def test_convert_refusals(workspace, capsys, extra, patterns) -> None:
    root, model_dir, _ = workspace
    argv = ["convert", "--model", str(model_dir), "--experts", str(E), *extra]
    code = main([*argv, "--out", str(root / "refused")])
    _one_line_error(code, capsys.readouterr().err, *patterns)
    assert not (root / "refused").exists()


def test_method_choices_come_from_the_registry() -> None:
    register_split_method("convert-choice-test")(lambda request: None)
    try:
        args = build_parser().parse_args(["convert", "--method", "convert-choice-test"])
        assert args.method == "convert-choice-test"
    finally:
        SPLIT_METHODS.unregister("convert-choice-test")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--method", "convert-choice-test"])
