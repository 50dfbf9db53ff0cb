"""Shared experts: the most active neurons, run for every token on every path, saved and loaded;
the load bias of the top-k choice; the refusals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from moefy.arch import find_ffns
from moefy.errors import MoefyError
from moefy.kernels import cpu as cpu_kernels
from moefy.kernels import use_backend
from moefy.moe import (
    SPLIT_METHODS,
    MoEfyConfig,
    OracleSelector,
    from_pretrained,
    moe_layers,
    moefy_,
    register_split_method,
    save,
    set_selection,
    unmoefy,
)
from moefy.moe.convert import model_fingerprint
from moefy.moe.rules import dynamic_k_mask, relative_to_max_mask
from moefy.routing import attach_routers, set_routing
from tiny_models import tiny_inputs, tiny_model

E, NS = 8, 2  # tiny models have d_ff = 64: 8 experts of 8 neurons, 2 of them shared
SHARED = NS / E


class RatesProfile:
    """Stands in for a SparsityProfile with activation rates, patterns and co-activation."""

    def __init__(self, model, *, seed: int = 0, tokens: int = 16, top_share: float = 0.1):
        sites = find_ffns(model)
        gen = torch.Generator().manual_seed(seed)
        widths = [site.weights().d_ff for site in sites]
        self.fingerprint = model_fingerprint(model, sites)
        self.config = SimpleNamespace(top_share=top_share)
        self.has_activation_rates = True
        self.rates = [torch.rand(f, generator=gen) for f in widths]
        self.patterns = [torch.rand(f, tokens, generator=gen) for f in widths]
        self.coactivations = [p @ p.t() for p in self.patterns]

    def activation_rate(self, i: int) -> torch.Tensor:
        return self.rates[i].clone()

    def activation_patterns(self, i: int) -> torch.Tensor:
        return self.patterns[i].clone()

    def coactivation(self, i: int) -> torch.Tensor:
        return self.coactivations[i].clone()


def _shared_model(name: str = "llama", method: str = "params", **config):
    model = tiny_model(name)
    profile = RatesProfile(model)
    cfg = MoEfyConfig(num_experts=E, method=method, shared=config.pop("shared", SHARED), **config)
    moefy_(model, cfg, profile=profile)
    return model, profile


def _tokens(n: int = 24, d: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _assert_shared_always_ran(model) -> None:
    for moe in moe_layers(model):
        seen = int(moe.tokens_seen)
        assert seen > 0
        assert moe.selection_counts[: moe.num_shared].tolist() == [seen] * moe.num_shared


# ----------------------------------------------------------------------------- config, layout


def test_config_round_trip_old_configs_and_layout() -> None:
    cfg = MoEfyConfig(num_experts=E, shared=0.125, shared_rule="profile")
    assert MoEfyConfig.from_json(cfg.to_json()) == cfg
    old = {k: v for k, v in MoEfyConfig(num_experts=E).to_dict().items() if "shared" not in k}
    assert MoEfyConfig.from_dict(old) == MoEfyConfig(num_experts=E)
    layout = MoEfyConfig(num_experts=E, shared=SHARED).layout(64)
    assert layout.num_shared == NS and layout.shared_neurons == 16
    routed = layout.routed()
    assert (routed.num_experts, routed.num_shared, routed.d_ff) == (E - NS, 0, 48)
    assert MoEfyConfig(num_experts=E, shared=0.05).layout(64).num_shared == 0  # rounds to none


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"shared": 1.0}, "shared"),
        ({"shared": -0.1}, "shared"),
        ({"shared": float("nan")}, "shared"),
        ({"shared": "0.5"}, "shared"),
        ({"shared_rule": "auto"}, "shared_rule"),
    ],
)
def test_config_refuses_bad_shared(settings: dict, match: str) -> None:
    with pytest.raises(MoefyError, match=match):
        MoEfyConfig(num_experts=E, **settings)


def test_a_share_that_leaves_no_routed_expert_says_the_numbers() -> None:
    with pytest.raises(MoefyError, match=r"shared=0\.8 of 2 experts makes 2 shared.*no routed"):
        MoEfyConfig(num_experts=2, shared=0.8).layout(64)
    model = tiny_model("llama")
    with pytest.raises(MoefyError, match="no routed"):
        moefy_(model, MoEfyConfig(num_experts=2, shared=0.8), profile=RatesProfile(model))
    assert not moe_layers(model)


# ----------------------------------------------------------------------------- conversion


def test_shared_experts_hold_the_most_active_neurons() -> None:
    model, profile = _shared_model()
    for moe in moe_layers(model):
        rates = profile.rates[moe.layer_index]
        top = set(torch.argsort(rates, descending=True)[: NS * 8].tolist())
        assert moe.num_shared == NS
        assert set(moe.perm[:NS].flatten().tolist()) == top
        # expert 0 holds the very most active ones
        assert set(moe.perm[0].tolist()) == set(torch.argsort(rates, descending=True)[:8].tolist())


def test_split_method_sees_only_the_routed_neurons() -> None:
    seen = []

    @register_split_method("record-test", needs_coactivation=True, needs_patterns=True)
    def record(request):
        seen.append(request)
        return torch.repeat_interleave(torch.arange(len(request.capacities)), request.capacities)

    try:
        model = tiny_model("gpt2")
        dense = [site.weights() for site in find_ffns(model)]
        profile = RatesProfile(model)
        moefy_(
            model, MoEfyConfig(num_experts=E, method="record-test", shared=SHARED), profile=profile
        )
    finally:
        SPLIT_METHODS.unregister("record-test")
    for i, (request, moe) in enumerate(zip(seen, moe_layers(model), strict=True)):
        rest = torch.argsort(profile.rates[i], descending=True)[16:].sort().values
        assert request.layout.num_experts == E - NS and request.layout.num_shared == 0
        assert request.weights.d_ff == 48
        torch.testing.assert_close(request.weights.w_up, dense[i].w_up.detach()[rest])
        torch.testing.assert_close(request.weights.w_down, dense[i].w_down.detach()[:, rest])
        torch.testing.assert_close(request.coactivation, profile.coactivations[i][rest][:, rest])
        torch.testing.assert_close(request.patterns, profile.patterns[i][rest])
        # routed expert e holds the e-th run of the routed neurons: labels were mapped back
        assert moe.perm[NS:].flatten().tolist() == rest.tolist()


def test_profile_rule_counts_frequent_neurons_per_layer() -> None:
    model = tiny_model("llama")
    profile = RatesProfile(model, top_share=0.1)
    profile.rates[0] = torch.zeros(64)
    profile.rates[0][:20] = 0.5  # 20 neurons >= 2 x 0.1: 2.5 experts of 8 -> 3
    profile.rates[1] = torch.full((64,), 0.15)  # none twice the average
    moefy_(model, MoEfyConfig(num_experts=E, shared_rule="profile"), profile=profile)
    assert [moe.num_shared for moe in moe_layers(model)] == [3, 0]
    capped = tiny_model("llama")
    moefy_(capped, MoEfyConfig(num_experts=E, shared=0.125, shared_rule="profile"), profile=profile)
    assert [moe.num_shared for moe in moe_layers(capped)] == [1, 0]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_every_expert_equals_dense_and_unmoefy_is_exact(name: str, run, fp32) -> None:
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    dense = run(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moefy_(model, MoEfyConfig(num_experts=E, shared=SHARED), profile=RatesProfile(model))
    torch.testing.assert_close(run(model, inputs), dense, **fp32)
    set_selection(model, k=3)
    assert not torch.equal(run(model, inputs), dense)
    unmoefy(model)
    assert torch.equal(run(model, inputs), dense)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


# ----------------------------------------------------------------------------- every mask path


def _oracle_topk(model):
    set_selection(model, k=3)


def _oracle_dynamic(model):
    set_routing(model, "dynamic", tau=0.3)


def _oracle_relative(model):
    set_routing(model, "relative", tau=0.2)


def _centroid_topk(model):
    attach_routers(model, "centroid", fraction=0.375)


def _linear_relative(model):
    attach_routers(model, "linear", rule="relative", tau=0.5)


@pytest.mark.parametrize(
    "select", [_oracle_topk, _oracle_dynamic, _oracle_relative, _centroid_topk, _linear_relative]
)
def test_shared_experts_are_in_every_mask(select, run) -> None:
    model, _ = _shared_model()
    select(model)
    for moe in moe_layers(model):
        assert moe.selector.num_shared == NS and moe.selector.kernel_route() is None
        moe.reset_counters()
    run(model, tiny_inputs("llama"))
    _assert_shared_always_ran(model)


def test_topk_keep_counts_shared_experts() -> None:
    model, _ = _shared_model()
    set_selection(model, keep=0.5)  # 4 of 8 experts: the 2 shared and 2 routed
    moe = moe_layers(model)[0]
    mask = moe.selector(_tokens(), moe)
    assert mask.sum(dim=-1).tolist() == [4] * 24 and bool(mask[:, :NS].all())
    norms = moe.expert_norms(_tokens())[:, NS:]  # (N, E - NS)
    best = torch.zeros(norms.shape, dtype=torch.bool).scatter_(1, norms.topk(2).indices, True)
    assert torch.equal(mask[:, NS:], best)


@pytest.mark.parametrize(
    ("rule", "tau", "reference"),
    [("dynamic", 0.5, dynamic_k_mask), ("relative", 0.3, relative_to_max_mask)],
)
def test_tau_rules_run_over_the_routed_scores(rule, tau, reference) -> None:
    model, _ = _shared_model()
    moe = moe_layers(model)[0]
    moe.selector.set_rule(rule, tau)
    x = _tokens()
    mask = moe.selector(x, moe)
    assert bool(mask[:, :NS].all())
    assert torch.equal(mask[:, NS:], reference(moe.expert_norms(x)[:, NS:], tau))


def test_k_below_the_shared_count_runs_exactly_the_shared_experts() -> None:
    model, _ = _shared_model()
    set_selection(model, k=1)
    moe = moe_layers(model)[0]
    assert moe.selector.num_selected() == NS
    x = _tokens()
    moe.reset_counters()
    out = moe(x)
    assert moe.selection_counts.tolist() == [24] * NS + [0] * (E - NS)
    only_shared = torch.zeros(24, E, dtype=torch.bool)
    only_shared[:, :NS] = True
    torch.testing.assert_close(out, moe._forward_grouped(x, only_shared))
    assert moe.flops_per_token() == moe.flops_per_token(experts_per_token=NS)


def test_a_given_selection_gets_the_shared_experts() -> None:
    model, _ = _shared_model()
    moe = moe_layers(model)[0]
    x = _tokens()
    moe.reset_counters()
    moe.select_next(torch.full((24, 1), 5))
    moe(x)
    assert moe.selection_counts.tolist() == [24, 24, 0, 0, 0, 24, 0, 0]


@pytest.mark.parametrize("router", [None, "linear"])
def test_training_path_keeps_shared_experts(router) -> None:
    model, _ = _shared_model()
    if router is None:
        set_selection(model, k=3)
    else:
        attach_routers(model, router, k=3)
    moe = moe_layers(model)[0]
    records = []
    moe.record_training(records, straight_through=None if router is None else 0.5)
    out = moe(_tokens())
    moe.record_training(None)
    assert bool(records[0].mask[:, :NS].all())
    assert records[0].mask.sum(dim=-1).tolist() == [3] * 24
    out.square().sum().backward()  # the gates of shared experts carry no boundary
    if router is not None:
        assert moe.selector.proj.weight.grad is not None


def test_kernel_path_runs_shared_experts_as_selected_blocks(monkeypatch) -> None:
    model, _ = _shared_model()
    routers = attach_routers(model, "linear", fraction=0.5)
    with torch.no_grad():
        for i, router in enumerate(routers):
            for p in router.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    assert all(router.kernel_route() is None for router in routers)
    inputs = tiny_inputs("llama", batch=1, seq=6)
    with torch.no_grad(), use_backend("reference"):
        expected = model(**inputs).logits
    calls = {"expert_ffn": 0, "routed_expert_ffn": 0}
    for name in calls:
        real = getattr(cpu_kernels, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(cpu_kernels, name, counted)
    for moe in moe_layers(model):
        moe.reset_counters()
    with torch.no_grad(), use_backend("cpu"):
        got = model(**inputs).logits
    assert calls["expert_ffn"] > 0 and calls["routed_expert_ffn"] == 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    _assert_shared_always_ran(model)


# ----------------------------------------------------------------------------- the selector


def test_selector_follows_the_layer() -> None:
    model, _ = _shared_model()
    moe = moe_layers(model)[0]
    moe.selector = OracleSelector(E, k=3)
    assert moe.selector.num_shared == NS
    moe.num_shared = 1
    assert moe.selector.num_shared == 1 and moe.layer_record()["num_shared"] == 1
    for bad in (E, -1, 1.5, True):
        with pytest.raises(MoefyError, match="num_shared"):
            moe.num_shared = bad


def test_load_bias_steers_topk_only() -> None:
    model, _ = _shared_model()
    moe = moe_layers(model)[0]
    moe.selector.set_topk(k=3)
    x = _tokens()
    bias = torch.zeros(E)
    bias[6] = 1e6
    moe.selector.set_load_bias(bias)
    mask = moe.selector(x, moe)
    assert bool(mask[:, [0, 1, 6]].all()) and mask.sum().item() == 3 * 24
    moe.selector.set_rule("relative", 0.3)
    unbiased = relative_to_max_mask(moe.expert_norms(x)[:, NS:], 0.3)
    assert torch.equal(moe.selector(x, moe)[:, NS:], unbiased)
    for bad in (torch.zeros(E - 1), torch.zeros(E, dtype=torch.long), torch.full((E,), torch.inf)):
        with pytest.raises(MoefyError, match="load bias"):
            moe.selector.set_load_bias(bad)
    moe.selector.set_load_bias(None)
    assert moe.selector.load_bias is None and "load_bias" not in moe.selector.to_dict()


def test_load_bias_turns_off_the_fused_kernel() -> None:
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=E))
    router = attach_routers(model, "linear", fraction=0.25)[0]
    assert router.kernel_route() is not None
    router.set_load_bias(torch.zeros(E))
    assert router.kernel_route() is None


# ----------------------------------------------------------------------------- saving


def test_save_load_keeps_shared_experts_and_load_bias(tmp_path, run) -> None:
    model, _ = _shared_model()
    routers = attach_routers(model, "linear", fraction=0.5)
    for i, router in enumerate(routers):
        router.set_load_bias(torch.randn(E, generator=torch.Generator().manual_seed(i)))
    inputs = tiny_inputs("llama")
    expected = run(model, inputs)
    save(model, tmp_path / "moe")
    loaded = from_pretrained(tmp_path / "moe")
    assert torch.equal(run(loaded, inputs), expected)
    for ours, theirs in zip(moe_layers(model), moe_layers(loaded), strict=True):
        assert theirs.num_shared == NS and theirs.selector.num_shared == NS
        assert torch.equal(theirs.selector.load_bias, ours.selector.load_bias)
    assert loaded.config is not None and moe_layers(loaded)[0].moefy_config.shared == SHARED


def test_records_without_num_shared_load_and_bad_ones_are_refused(tmp_path, run) -> None:
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=E))
    set_selection(model, k=3)
    save(model, tmp_path / "old")
    record_file = tmp_path / "old" / "moefy_config.json"
    record = json.loads(record_file.read_text())
    for layer in record["layers"]:
        del layer["num_shared"]  # as written before shared experts
    record_file.write_text(json.dumps(record))
    loaded = from_pretrained(tmp_path / "old")
    assert [moe.num_shared for moe in moe_layers(loaded)] == [0, 0]
    inputs = tiny_inputs("llama")
    assert torch.equal(run(loaded, inputs), run(model, inputs))
    record["layers"][0]["num_shared"] = E
    record_file.write_text(json.dumps(record))
    with pytest.raises(MoefyError, match="num_shared"):
        from_pretrained(tmp_path / "old")


# ----------------------------------------------------------------------------- refusals


def test_shared_experts_need_a_profile_with_rates() -> None:
    model = tiny_model("llama")
    with pytest.raises(MoefyError, match="shared experts need profile="):
        moefy_(model, MoEfyConfig(num_experts=E, shared=SHARED))
    with pytest.raises(MoefyError, match="shared experts need profile="):
        moefy_(model, MoEfyConfig(num_experts=E, shared_rule="profile"))
    old = RatesProfile(model)
    old.has_activation_rates = False
    with pytest.raises(MoefyError, match="no activation rates"):
        moefy_(model, MoEfyConfig(num_experts=E, shared=SHARED), profile=old)
    short = RatesProfile(model)
    short.rates[1] = torch.rand(10)
    with pytest.raises(MoefyError, match="activation rates of layer 1"):
        moefy_(model, MoEfyConfig(num_experts=E, shared=SHARED), profile=short)
    assert not moe_layers(model)


def test_a_method_that_needs_patterns_needs_a_profile() -> None:
    register_split_method("patterns-test", needs_patterns=True)(lambda request: None)
    try:
        model = tiny_model("llama")
        with pytest.raises(MoefyError, match="'patterns-test' needs profile="):
            moefy_(model, MoEfyConfig(num_experts=E, method="patterns-test"))
    finally:
        SPLIT_METHODS.unregister("patterns-test")
    assert not moe_layers(model)
