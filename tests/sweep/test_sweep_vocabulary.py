"""The sweep reads layer methods from ``moefy.layers.LAYER_METHODS`` and says what a level is
with one word, keep (the share of the FFN kept)."""

from __future__ import annotations

import pytest

from moefy.layers import LAYER_METHODS
from moefy.layers.choose import LayerMethod
from moefy.layers.config import DropConfig
from moefy.sweep import render_report
from moefy.sweep.methods import KEEP, LAYER_LEVELS, METHODS, get_method, method_names


@pytest.fixture
def toy_layer_method():
    name = "drop-nothing-test"
    LAYER_METHODS.register(
        name,
        LayerMethod(lambda model, level, importance: DropConfig(), needs_importance=False),
        help="drops nothing (a test's toy)",
        kept=0,
        sweep_levels=(1, 3),
    )
    yield name
    LAYER_METHODS.unregister(name)


def test_layer_methods_come_from_their_registry(toy_layer_method):
    assert {"drop-attn", "drop-mlp", "drop-block", "skip"} <= set(method_names())
    method = get_method(toy_layer_method)
    assert (method.family, method.level_meaning, method.default_levels) == (
        "layers",
        LAYER_LEVELS,
        (1, 3),
    )
    assert not method.uses_shared_levels
    assert METHODS.get(toy_layer_method).help == "drops nothing (a test's toy)"
    assert METHODS.get("skip").help == LAYER_METHODS.get("skip").help
    assert get_method("skip").default_levels == (2, 4, 8)


def test_an_unregistered_layer_method_leaves_the_sweep(toy_layer_method):
    assert toy_layer_method in method_names()
    LAYER_METHODS.unregister(toy_layer_method)
    assert toy_layer_method not in method_names()


def test_ffn_methods_say_keep():
    for name in ("moe-oracle", "moe-mlp", "teal", "cats"):
        assert get_method(name).level_meaning == KEEP == "keep (share of the FFN kept)"


def test_the_report_says_keep_for_ffn_levels():
    rows = [
        {"method": "dense", "level": None, "ffn_flops_fraction": 1.0, "perplexity": 10.0},
        {
            "method": "teal",
            "family": "threshold",
            "level": 0.5,
            "level_meaning": KEEP,
            "ffn_flops_fraction": 0.45,
            "perplexity": 11.0,
        },
    ]
    page = render_report(rows)
    assert "<b>teal</b> at keep 0.5 " in page  # the headline
    assert "<th>level is</th>" in page and f"<td>{KEEP}</td>" in page  # the table
