"""A method is one module: a toy method registered from this file alone shows up in
``moefy sparsify --help``, runs through ``moefy sparsify`` and the sweep, draws its curve in the
report, and disappears again when unregistered; bad registrations and unknown names fail in one
line."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import ClassVar

import pytest

from moefy.cli.main import build_parser, main
from moefy.errors import MoefyError
from moefy.eval import EvalConfig
from moefy.sparsify import (
    CONFIG_CLASSES,
    HANDLERS,
    SparsifyConfig,
    config_from_dict,
    load_sparse,
    sparsify_config_of,
)
from moefy.sparsify.methods import (
    Allocation,
    MethodHandler,
    MethodOption,
    TEALConfig,
    TEALHandler,
    register_sparsify_method,
    unregister_sparsify_method,
)
from moefy.sparsify.methods.base import swap
from moefy.sweep import SweepConfig, sweep
from moefy.sweep.methods import default_method_names, get_method, method_names
from tiny_models import save_tiny_hf_folder, write_word_text

LEVELS = (0.5, 0.25)
ZERO_SCALE = MethodOption(
    "--zero-scale", "scale", "inputs at or below scale * sparsity are zeroed", parse=float
)


@dataclass(frozen=True)
class HalfZeroConfig(SparsifyConfig):
    """Zero down-projection inputs with ``|x| <= scale * sparsity`` (no calibration)."""

    method: ClassVar[str] = "halfzero"

    scale: float = 0.01


class HalfZeroHandler(MethodHandler):
    """One fixed threshold, ``scale * sparsity``, on the input of every FFN down projection."""

    def install(self, model, config):
        from moefy.arch import find_ffns
        from moefy.sparsify.wrappers import ThresholdLinear

        wrapped = []
        for site in find_ffns(model):
            wrapper = ThresholdLinear(site.part("down"), layer=site.index, role=site.spec.down)
            swap(model, site.module_path("down"), wrapper, wrapped)
        return wrapped

    def calibrate(self, model, wrapped, config, data, calibration, progress):
        threshold = config.scale * config.sparsity
        allocations = []
        for path, wrapper in wrapped:
            wrapper.threshold.fill_(threshold)
            allocations.append(
                Allocation(path, wrapper.layer, wrapper.role, config.sparsity, threshold, None)
            )
        return allocations, None


@pytest.fixture
def halfzero():
    """The toy method, registered for one test."""
    register_sparsify_method(
        name="halfzero",
        config_cls=HalfZeroConfig,
        handler=HalfZeroHandler(),
        help="zero small down-projection inputs with a fixed threshold",
        cli_options=(ZERO_SCALE,),
        sweep_levels=LEVELS,
    )
    yield "halfzero"
    unregister_sparsify_method("halfzero")


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A tiny llama folder and a text of documents made of its tokenizer's words."""
    root = tmp_path_factory.mktemp("registry")
    return save_tiny_hf_folder(root / "model"), write_word_text(root / "text.jsonl", docs=300)


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes


def test_registered_method_is_in_the_config_tables_and_the_help(halfzero, capsys):
    assert CONFIG_CLASSES["halfzero"] is HalfZeroConfig
    assert isinstance(HANDLERS[HalfZeroConfig], HalfZeroHandler)
    assert config_from_dict({"method": "halfzero", "scale": 0.5}) == HalfZeroConfig(scale=0.5)
    sparsify_help = _help(["sparsify", "--help"], capsys)
    assert re.search(r"--method \{[^}]*halfzero[^}]*\}", sparsify_help.replace(", ", ","))
    assert "halfzero: zero small down-projection inputs" in sparsify_help
    assert "--zero-scale" in sparsify_help and "halfzero: inputs at or below" in sparsify_help
    assert "--attention" in sparsify_help  # the built-in methods' options stay, listed once
    assert sparsify_help.count("--no-greedy") == 2  # usage line and option list
    assert "halfzero" in _help(["--help"], capsys)  # the command's one-line help
    assert get_method("halfzero").family == "threshold"
    assert get_method("halfzero").default_levels == LEVELS
    assert "halfzero" in default_method_names()


def test_sparsify_command_runs_the_method_with_its_option(halfzero, setting, tmp_path, capsys):
    model, text = setting
    out = tmp_path / "halfzero"
    argv = ["sparsify", "--model", str(model), "--data", str(text), "--method", "halfzero"]
    argv += ["--zero-scale", "0.02", "--eval-tokens", "128", "--block-len", "32"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "sparsify_report.json").read_text())
    assert report["method"] == "halfzero"
    assert 0.0 < report["measured_weight_sparsity"] < 1.0
    assert sparsify_config_of(load_sparse(out)) == HalfZeroConfig(sparsity=0.5, scale=0.02)
    capsys.readouterr()
    assert main([*argv, "--attention", "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "halfzero takes no --attention" in err and "wina only" in err


def test_sweep_runs_the_method_and_the_report_draws_its_curve(halfzero, setting, tmp_path):
    model, text = setting
    config = SweepConfig(
        model=str(model),
        methods=("dense", "halfzero"),
        eval=EvalConfig(
            data=str(text), tasks=("perplexity",), tokens=512, agreement_tokens=128, block_len=32
        ),
        calibration_tokens=1536,
    )
    result = sweep(config, tmp_path / "sweep")
    rows = {r["level"]: r for r in result.rows if r["method"] == "halfzero"}
    assert sorted(rows) == sorted(LEVELS)  # the levels the registration declared
    assert 0.0 < rows[0.5]["measured_sparsity"] < rows[0.25]["measured_sparsity"]
    assert rows[0.25]["ffn_flops_fraction"] < rows[0.5]["ffn_flops_fraction"] < 1.0
    page = result.report.read_text()
    found = re.search(r'<script type="application/json" id="moefy-curves">(.*?)</script>', page)
    assert found
    curves = json.loads(found.group(1))
    assert sorted(curves["perplexity_ratio"]) == ["dense", "halfzero"]
    assert len(curves["perplexity_ratio"]["halfzero"]) == len(LEVELS)
    assert "halfzero" in page.split('id="moefy-curves"')[0]  # a row of the table


def test_unregistered_method_is_gone_everywhere(setting):
    register_sparsify_method(name="halfzero", config_cls=HalfZeroConfig, handler=HalfZeroHandler())
    assert "halfzero" in method_names()
    unregister_sparsify_method("halfzero")
    assert "halfzero" not in CONFIG_CLASSES and "halfzero" not in method_names()
    with pytest.raises(MoefyError, match="unknown sparsify method 'halfzero'"):
        config_from_dict({"method": "halfzero"})


@pytest.mark.parametrize(
    ("registration", "pattern"),
    [
        ({"name": "teal", "config_cls": TEALConfig}, "'teal' exists already"),
        ({"name": "other", "config_cls": HalfZeroConfig}, "method is 'halfzero'"),
        ({"name": "halfzero", "config_cls": dict}, "SparsifyConfig subclass"),
        ({"name": "halfzero", "handler": object()}, "must be a MethodHandler"),
        ({"name": "halfzero", "sweep_levels": (0.5, 1.5)}, "kept shares in"),
        ({"name": "halfzero", "cli_options": (MethodOption("--x", "nope", "?"),)}, "sets no field"),
        (
            {"name": "halfzero", "cli_options": (MethodOption("--attention", "scale", "?"),)},
            "--attention is defined differently",
        ),
    ],
)
def test_bad_registrations_are_refused_in_one_line(registration, pattern):
    arguments = {"config_cls": HalfZeroConfig, "handler": HalfZeroHandler(), **registration}
    with pytest.raises(MoefyError, match=pattern) as error:
        register_sparsify_method(**arguments)
    assert "\n" not in str(error.value)
    assert "halfzero" not in CONFIG_CLASSES
    assert isinstance(HANDLERS[TEALConfig], TEALHandler)  # the built-in stays as it was


def test_unknown_method_names_a_close_match_in_one_line(capsys):
    with pytest.raises(MoefyError, match=r"unknown sparsify method 'tael' \(did you mean 'teal'"):
        config_from_dict({"method": "tael", "sparsity": 0.5})
    with pytest.raises(MoefyError, match=r"unknown sweep method 'wnia' \(did you mean 'wina'"):
        SweepConfig(methods=("dense", "wnia"))
    with pytest.raises(SystemExit) as exit_info:
        main(["sparsify", "--method", "tael"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "invalid choice: 'tael'" in err
