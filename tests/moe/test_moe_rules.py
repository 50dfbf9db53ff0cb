"""The selection-rule and selector registries: a new rule or selector is one class and one
register call, usable at once by every selector and by saved models."""

from __future__ import annotations

import pytest
import torch

from moefy.errors import MoefyError
from moefy.moe.module import MoEFFN
from moefy.moe.rules import SELECTION_RULES, SelectionRule
from moefy.moe.selectors import (
    SELECTORS,
    ExpertSelector,
    OracleSelector,
    register_selector,
    selector_from_dict,
)


class AboveMeanRule(SelectionRule):
    """Experts whose score reaches tau times the token's mean score."""

    def mask(self, scores, *, k, tau):
        return scores >= tau * scores.mean(dim=-1, keepdim=True)


@pytest.fixture
def above_mean():
    SELECTION_RULES.register("above_mean", AboveMeanRule(), help="score >= tau x mean")
    yield
    SELECTION_RULES.unregister("above_mean")


def test_a_registered_rule_selects_through_any_rule_selector(above_mean):
    selector = OracleSelector(4, rule="above_mean", tau=1.0)
    scores = torch.tensor([[4.0, 3.0, 1.0, 0.0]])  # mean 2
    assert selector.mask_from_scores(scores).tolist() == [[True, True, False, False]]
    assert not selector.selects_all()  # a tau rule never means "every expert"
    data = selector.to_dict()
    rebuilt = selector_from_dict(data, num_experts=4, d_model=8)
    assert (rebuilt.rule, rebuilt.tau) == ("above_mean", 1.0)


def test_rules_check_their_budget(above_mean):
    selector = OracleSelector(4)
    with pytest.raises(MoefyError, match="unknown selection rule 'topkk'.*did you mean 'topk'"):
        selector.set_rule("topkk")
    with pytest.raises(
        MoefyError, match="tau applies to the dynamic, relative and above_mean rules, not topk"
    ):
        selector.set_rule("topk", tau=0.5)
    with pytest.raises(MoefyError, match="tau"):
        selector.set_rule("above_mean")
    assert (selector.rule, selector.tau) == ("topk", None)  # a refused change changes nothing


def test_built_in_rules_are_registered_in_order():
    assert SELECTION_RULES.names()[:3] == ["topk", "dynamic", "relative"]
    assert [SELECTION_RULES.get(n).value.budget for n in ("topk", "dynamic")] == ["k", "tau"]


def test_a_registered_selector_rebuilds_from_its_record():
    @register_selector
    class LastExperts(ExpertSelector):
        """Prefers the experts with the highest index."""

        selector_type = "last_experts_test"

        def scores(self, x, moe):
            return torch.arange(self.num_experts, dtype=x.dtype).expand(len(x), -1)

    try:
        moe = MoEFFN(8, 4, 2, gated=False, act=torch.nn.ReLU(), selector=LastExperts(4, k=1))
        moe(torch.randn(3, 8))
        assert moe.selection_counts.tolist() == [0, 0, 0, 3]
        rebuilt = selector_from_dict(moe.selector.to_dict(), num_experts=4, d_model=8)
        assert type(rebuilt) is LastExperts and rebuilt.k == 1
        assert (
            SELECTORS.get("last_experts_test").help == "Prefers the experts with the highest index."
        )
    finally:
        SELECTORS.unregister("last_experts_test")
    with pytest.raises(MoefyError, match="unknown expert selector 'last_experts_test'"):
        selector_from_dict({"type": "last_experts_test"}, num_experts=4, d_model=8)


def test_learned_routers_register_on_first_lookup():
    assert {"oracle", "mlp", "linear", "centroid"} <= set(SELECTORS.names())


def test_moe_state_dict_keys_are_unchanged():
    moe = MoEFFN(8, 4, 2, gated=True, act=torch.nn.SiLU(), in_bias=True, out_bias=True)
    assert list(moe.state_dict()) == ["w_in", "w_out", "b_in", "b_out", "perm"]
