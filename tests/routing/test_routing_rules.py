"""Selection rules, per-layer budgets and their errors."""

from __future__ import annotations

import pytest
import torch

from moefy.errors import MoefyError
from moefy.kernels.reference import top_k_mask
from moefy.moe import MoEfyConfig, moe_layers, moefy_, reset_tally
from moefy.moe.selectors import ExpertSelector, OracleSelector, selector_from_dict
from moefy.routing import (
    MLPRouter,
    attach_routers,
    dynamic_k_mask,
    relative_to_max_mask,
    set_routing,
)
from tiny_models import tiny_inputs, tiny_model


@pytest.fixture
def routed():
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    attach_routers(model, "mlp", hidden=16)
    return model


def test_dynamic_k_keeps_more_experts_for_spread_norms():
    peaked = [20.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]  # the first holds 0.85 of the total
    spread = [1.0] * 8
    mask = dynamic_k_mask(torch.tensor([peaked, spread]), 0.8)
    assert mask.sum(-1).tolist() == [1, 7]  # 0.8 of 8 equal shares needs 7 (6 reach 0.75)
    assert mask[0, 0] and not mask[0, 1:].any()


def test_dynamic_k_is_smallest_set_reaching_tau():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0]])  # total 10
    assert dynamic_k_mask(scores, 0.4).tolist() == [[False, True, False, False]]
    assert dynamic_k_mask(scores, 0.41).tolist() == [[False, True, True, False]]
    assert dynamic_k_mask(scores, 1.0).all()
    assert dynamic_k_mask(torch.zeros(1, 4), 0.5).sum() == 1  # always at least one expert


def test_ties_go_to_the_lower_expert_like_the_kernels():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])  # (N, E)
    selector = ExpertSelector(5, k=2)
    mask = selector.topk_mask(scores)
    assert mask.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    assert torch.equal(mask, top_k_mask(scores, 2))  # the kernels' fused-routing rule
    # dynamic k over equal shares keeps the first ones too
    assert dynamic_k_mask(scores[1:] + 1.0, 0.4).tolist() == [[True, True, False, False, False]]


def test_relative_to_max():
    scores = torch.tensor([[4.0, 3.0, 1.0, 2.0]])
    assert relative_to_max_mask(scores, 0.5).tolist() == [[True, True, False, True]]
    assert relative_to_max_mask(scores, 0.1).tolist() == [[True, False, False, False]]
    assert relative_to_max_mask(scores, 1.0).all()


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.01, 2, float("nan"), "0.5", True])
def test_tau_outside_unit_interval_is_refused(routed, tau):
    router = moe_layers(routed)[0].selector
    with pytest.raises(MoefyError, match="tau"):
        router.set_rule("dynamic", tau)
    with pytest.raises(MoefyError, match="tau"):
        set_routing(routed, "relative", tau=tau)
    with pytest.raises(MoefyError, match="tau"):
        MLPRouter(8, 32, rule="dynamic", tau=tau)


def test_unknown_rule_and_tau_on_topk(routed):
    with pytest.raises(MoefyError, match="unknown selection rule"):
        set_routing(routed, "sometimes", tau=0.5)
    with pytest.raises(MoefyError, match="tau applies"):
        set_routing(routed, "topk", tau=0.5)


def test_per_layer_topk_budget_is_honoured(routed):
    set_routing(routed, "topk", k=[2, 5])
    reset_tally(routed)
    with torch.no_grad():
        routed(**tiny_inputs("llama"))
    assert [m.active_fraction for m in moe_layers(routed)] == [2 / 8, 5 / 8]


def test_per_layer_tau_budget_is_honoured(routed):
    set_routing(routed, "dynamic", tau=[0.3, 1.0])
    reset_tally(routed)
    with torch.no_grad():
        routed(**tiny_inputs("llama"))
    low, full = moe_layers(routed)
    assert (low.selector.rule, low.selector.tau, full.selector.tau) == ("dynamic", 0.3, 1.0)
    assert full.active_fraction == 1.0  # tau 1 keeps every expert with a positive score
    assert low.active_fraction < 1.0


def test_mismatched_budget_length_changes_nothing(routed):
    set_routing(routed, "topk", k=3)
    with pytest.raises(MoefyError, match="budget has 3 values but the model has 2"):
        set_routing(routed, "dynamic", tau=[0.9, 0.8, 0.7])
    with pytest.raises(MoefyError, match="budget has 1 values"):
        set_routing(routed, "topk", fraction=[0.5])
    # a bad value in the second layer rolls back the first
    with pytest.raises(MoefyError, match="tau"):
        set_routing(routed, "dynamic", tau=[0.5, 1.5])
    assert [(m.selector.rule, m.selector.k) for m in moe_layers(routed)] == [("topk", 3)] * 2


class _FirstExperts(ExpertSelector):
    """A selector without selection rules (top-k only)."""

    selector_type = "first-experts-test"

    def scores(self, x, moe):
        return -torch.arange(self.num_experts, dtype=x.dtype).expand(x.shape[0], -1)


def test_rule_needs_a_router_or_the_oracle():
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    for moe in moe_layers(model):
        moe.selector = _FirstExperts(8)
    with pytest.raises(MoefyError, match="needs a router or the oracle"):
        set_routing(model, "dynamic", tau=0.9)
    assert set_routing(model, "topk", fraction=0.5) == 2


def test_oracle_dynamic_k_keeps_the_true_norm_share():
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    inputs = tiny_inputs("llama")
    layers = moe_layers(model)
    seen = []
    handles = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for m in layers]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    set_routing(model, "dynamic", tau=0.6)
    moe, x = layers[0], seen[0].reshape(-1, layers[0].d_model)
    assert isinstance(moe.selector, OracleSelector) and not moe.selector.scores_from_expert_hidden
    mask = moe.selector(x, moe)
    torch.testing.assert_close(mask, dynamic_k_mask(moe.expert_norms(x), 0.6), rtol=0, atol=0)
    # a smaller share keeps fewer experts, but the top expert always
    sizes = {tau: _routed_counts(model, inputs, tau) for tau in (0.3, 0.6, 0.9)}
    assert 0 < sizes[0.3] < sizes[0.6] < sizes[0.9] < 8 * 2 * inputs["input_ids"].numel()
    # its settings are saved; top-k oracles keep the format they had before dynamic k
    set_routing(model, "dynamic", tau=0.6)
    data = moe.selector.to_dict()
    assert (data["rule"], data["tau"]) == ("dynamic", 0.6)
    assert type(selector_from_dict(data, num_experts=8, d_model=32)) is OracleSelector
    set_routing(model, "topk", fraction=0.5)
    assert moe.selector.to_dict() == {"type": "oracle", "k": None, "fraction": 0.5}
    assert moe.selector.scores_from_expert_hidden


def _routed_counts(model, inputs, tau: float) -> int:
    set_routing(model, "dynamic", tau=tau)
    reset_tally(model)
    with torch.no_grad():
        model(**inputs)
    return int(sum(int(m.selection_counts.sum()) for m in moe_layers(model)))


def test_settings_round_trip_through_to_dict(routed):
    set_routing(routed, "relative", tau=[0.25, 0.5])
    for moe in moe_layers(routed):
        data = moe.selector.to_dict()
        rebuilt = selector_from_dict(data, num_experts=8, d_model=32)
        assert rebuilt.to_dict() == data
        assert type(rebuilt) is MLPRouter and rebuilt.hidden == 16


def test_only_top_k_routers_that_select_some_experts_run_in_the_kernel(routed):
    router = moe_layers(routed)[0].selector
    router.set_topk(k=3)
    k, layers = router.kernel_route()
    first, last = router.net[0], router.net[2]
    assert k == 3 and [(w is first.weight, b is first.bias) for w, b in layers[:1]] == [
        (True, True)
    ]
    assert layers[1][0] is last.weight and layers[1][1] is last.bias
    x = torch.randn(5, router.d_model)
    h = x
    for i, (weight, bias) in enumerate(layers):
        h = torch.nn.functional.linear(h.relu() if i else h, weight, bias)
    # the stack's output orders experts as the router's own scores do
    assert torch.equal(h.argsort(dim=-1), router.scores(x).argsort(dim=-1))
    router.set_rule("dynamic", tau=0.8)
    assert router.kernel_route() is None  # dynamic k: the selector's own forward
    router.set_rule("topk")
    router.set_topk()  # every expert
    assert router.kernel_route() is None
    assert OracleSelector(8, k=2).kernel_route() is None  # the oracle needs every expert


def test_routers_are_a_registry_with_help_from_their_docstrings():
    from moefy.routing.routers import ROUTERS

    assert set(ROUTERS) >= {"centroid", "mlp", "linear"}
    assert all(ROUTERS.get(name).help for name in ("centroid", "mlp", "linear"))
    with pytest.raises(MoefyError, match="unknown router 'mpl'"):
        ROUTERS.get("mpl")
