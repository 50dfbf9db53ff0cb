"""``keep``: the share of experts kept per token, and ``fraction``, its deprecated former name."""

from __future__ import annotations

import warnings

import pytest

from moefy.errors import MoefyError
from moefy.moe import MoEfyConfig, moe_layers, moefy_
from moefy.routing import attach_routers, set_routing
from moefy.validate import keep_or_fraction
from tiny_models import tiny_model


@pytest.fixture
def routed():
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    attach_routers(model, "mlp", hidden=16)
    return model


def test_keep_sets_the_share_of_experts(routed):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keep= warns about nothing
        assert set_routing(routed, "topk", keep=0.25) == 2
    assert [m.selector.num_selected() for m in moe_layers(routed)] == [2, 2]
    set_routing(routed, "topk", keep=[0.5, 0.125])  # one per layer
    assert [m.selector.num_selected() for m in moe_layers(routed)] == [4, 1]


def test_fraction_still_works_and_says_to_use_keep(routed):
    with pytest.warns(DeprecationWarning, match="use keep="):
        set_routing(routed, "topk", fraction=0.5)
    assert [m.selector.num_selected() for m in moe_layers(routed)] == [4, 4]


def test_keep_and_fraction_together_are_refused(routed):
    set_routing(routed, "topk", keep=0.25)
    with pytest.raises(MoefyError, match="not both"):
        set_routing(routed, "topk", keep=0.5, fraction=0.5)
    assert [m.selector.num_selected() for m in moe_layers(routed)] == [2, 2]  # unchanged


def test_keep_or_fraction_names_the_former_keyword():
    assert keep_or_fraction(0.5, None, where="f") == 0.5
    assert keep_or_fraction(None, None, where="f") is None
    with pytest.warns(DeprecationWarning, match=r"route_quality\(fractions=\.\.\.\)"):
        assert keep_or_fraction(None, (0.5,), where="route_quality", old="fractions") == (0.5,)


def test_set_selection_takes_keep_and_still_reads_fraction():
    from moefy.moe import set_selection

    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set_selection(model, keep=0.25) == 2
    assert [m.selector.num_selected() for m in moe_layers(model)] == [2, 2]
    with pytest.warns(DeprecationWarning, match="set_selection.*use keep="):
        set_selection(model, fraction=0.5)
    assert [m.selector.num_selected() for m in moe_layers(model)] == [4, 4]
    with pytest.raises(MoefyError, match="not both"):
        set_selection(model, keep=0.5, fraction=0.5)
