"""Router training on a tiny model, its report, and routers saved with the model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.moe import MoEfyConfig, from_pretrained, moe_layers, moefy_, save
from moefy.routing import (
    CentroidRouter,
    MLPRouter,
    RouterConfig,
    attach_routers,
    set_routing,
    train_routers,
)
from moefy.routing.train import _Reservoir
from tiny_models import VOCAB, tiny_inputs, tiny_model

EXPERTS = 8
FAST = dict(tokens_per_layer=768, epochs=15, batch_size=64, hidden=32)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: one thread avoids oversubscription on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _blocks(n_blocks: int = 32, block_len: int = 32, seed: int = 0) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    return TokenBlocks(torch.randint(3, VOCAB, (n_blocks, block_len), generator=gen))


def _moe_model():
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=EXPERTS, method="params"))
    return model


@pytest.fixture(scope="module")
def trained():
    model = _moe_model()
    report = train_routers(model, _blocks(), RouterConfig(router="mlp", **FAST))
    return model, report


def test_trained_router_beats_untrained_and_random(trained):
    _, report = trained
    assert len(report.layers) == 2 and report.n_tokens == 32 * 32
    for layer in report.layers:
        assert layer.random_recall == 2 / EXPERTS
        assert layer.recall > layer.untrained_recall + 0.15
        assert layer.recall > layer.random_recall + 0.25
        assert layer.norm_share <= layer.oracle_norm_share + 1e-6
        assert layer.n_holdout == 76 and layer.n_train == 768 - 76
        assert layer.final_loss == layer.final_loss  # trained: a number, not nan


def test_trained_routers_are_the_selectors_and_cost_what_they_compute(trained):
    model, report = trained
    for moe, layer in zip(moe_layers(model), report.layers, strict=True):
        assert isinstance(moe.selector, MLPRouter)
        params = sum(p.numel() for p in moe.selector.parameters())
        H, D, E = 32, 32, EXPERTS
        assert params == D * H + H + H * E + E
        # 2 FLOPs per weight, one add per bias, one ReLU per hidden unit
        assert layer.router_flops == 2 * (D * H + H * E) + 2 * H + E
        assert layer.saved_flops > 0


def test_save_load_keeps_routers(trained, tmp_path):
    model, _ = trained
    set_routing(model, "dynamic", tau=[0.9, 0.7])
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    save(model, tmp_path / "routed")
    record = json.loads((tmp_path / "routed" / "moefy_config.json").read_text())
    assert record["layers"][1]["selector"] == {
        "type": "mlp",
        "k": None,
        "fraction": None,
        "rule": "dynamic",
        "tau": 0.7,
        "hidden": 32,
    }
    loaded = from_pretrained(tmp_path / "routed")
    for a, b in zip(moe_layers(model), moe_layers(loaded), strict=True):
        assert type(b.selector) is MLPRouter
        for (name, p), (_, q) in zip(
            a.selector.state_dict().items(), b.selector.state_dict().items(), strict=True
        ):
            assert torch.equal(p, q), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    set_routing(model, "topk")


def test_centroid_router_needs_no_training_and_saves(tmp_path):
    model = _moe_model()
    report = train_routers(model, _blocks(8), RouterConfig(router="centroid", **FAST))
    for layer in report.layers:
        assert layer.recall == layer.untrained_recall
        assert layer.final_loss != layer.final_loss  # nan: not trained
    moe = moe_layers(model)[0]
    assert isinstance(moe.selector, CentroidRouter)
    # unit-length rows averaged: each centroid is at most unit length, and not zero
    norms = moe.selector.centroids.norm(dim=-1)
    assert bool((norms <= 1 + 1e-5).all()) and bool((norms > 0).all())
    set_routing(model, "topk", fraction=0.5)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    save(model, tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path / "c")(**inputs).logits, expected)
    # A fresh process that never imported moefy.routing loads the routed folder too.
    code = (
        "import sys; from moefy.models.load import load_model; from moefy.moe import moe_layers; "
        "m, _ = load_model(sys.argv[1]); print(type(moe_layers(m)[0].selector).__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "c")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "CentroidRouter"


@pytest.mark.parametrize("loss", ["listwise", "mse"])
def test_train_keeps_topk_setting_and_linear_router_learns(loss):
    model = _moe_model()
    set_routing(model, "topk", k=3)
    report = train_routers(model, _blocks(), RouterConfig(router="linear", loss=loss, **FAST))
    assert [m.selector.k for m in moe_layers(model)] == [3, 3]
    assert report.config["loss"] == loss
    assert all(layer.recall > layer.random_recall + 0.15 for layer in report.layers)


def test_listwise_loss_is_smallest_at_the_true_shares():
    from moefy.routing.train import ROUTER_LOSSES

    log_norms = torch.tensor([[2.0, 0.0, -1.0, 1.0], [0.5, 0.5, 0.0, -3.0]])
    listwise = ROUTER_LOSSES["listwise"]
    best = listwise(log_norms, log_norms)
    # a per-token shift changes no share, so no loss; any other change costs
    torch.testing.assert_close(listwise(log_norms + torch.tensor([[5.0], [-2.0]]), log_norms), best)
    swapped = log_norms[:, [1, 0, 2, 3]]
    assert float(listwise(swapped, log_norms)) > float(best) + 0.1
    assert float(ROUTER_LOSSES["mse"](log_norms + 1.0, log_norms)) == pytest.approx(1.0)


def test_training_leaves_the_global_random_state_alone():
    model = _moe_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_routers(model, _blocks(8), RouterConfig(router="linear", **FAST))
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_reservoir_is_bounded_and_uniform():
    gen = torch.Generator().manual_seed(0)
    reservoir = _Reservoir(100, 1, 1, torch.float32, "cpu")
    for start in range(0, 2000, 50):
        values = torch.arange(start, start + 50, dtype=torch.float32).unsqueeze(1)
        reservoir.add(values, values, gen)
    assert reservoir.seen == 2000 and reservoir.size == 100 and reservoir.inputs.shape == (100, 1)
    kept = reservoir.inputs.squeeze(1)
    assert torch.equal(kept, reservoir.targets.squeeze(1))
    assert 700 < float(kept.mean()) < 1300  # a uniform sample of 0..1999, not the first 100


def test_router_config_round_trip_and_errors():
    config = RouterConfig(router="linear", epochs=2)
    assert RouterConfig.from_json(config.to_json()) == config
    with pytest.raises(MoefyError, match="unknown"):
        RouterConfig(router="magic")
    with pytest.raises(MoefyError, match="epochs"):
        RouterConfig(epochs=0)
    with pytest.raises(MoefyError, match="loss"):
        RouterConfig(loss="hinge")
    with pytest.raises(MoefyError, match="unknown field"):
        RouterConfig.from_dict({"router": "mlp", "colour": 1})
    with pytest.raises(MoefyError, match="version"):
        RouterConfig(version=99)


def test_dense_model_is_refused():
    with pytest.raises(MoefyError, match="no MoE layers"):
        train_routers(tiny_model("llama"), _blocks(2))
    with pytest.raises(MoefyError, match="no MoE layers"):
        attach_routers(tiny_model("llama"), "mlp")


def test_later_rounds_learn_from_the_routed_models_inputs(monkeypatch):
    from moefy.routing import train as train_module

    seen = []
    real_collect = train_module._collect

    def spy(model, data, layers, config, *, dense, show, desc):
        settings = [(type(m.selector).__name__, m.selector.fraction) for m in layers]
        seen.append((dense, settings))
        return real_collect(model, data, layers, config, dense=dense, show=show, desc=desc)

    monkeypatch.setattr(train_module, "_collect", spy)
    config = RouterConfig(router="mlp", rounds=2, report_fraction=0.25, **FAST)
    once, twice = _moe_model(), _moe_model()
    train_routers(once, _blocks(), RouterConfig(router="mlp", **FAST))
    report = train_routers(twice, _blocks(), config)
    assert [dense for dense, _ in seen] == [True, True, False]
    # round 2 ran each layer's round-1 router at 25 % of experts
    assert seen[2][1] == [("MLPRouter", 0.25)] * 2
    for moe in moe_layers(twice):  # afterwards: the layers' own settings (every expert)
        assert isinstance(moe.selector, MLPRouter) and moe.selector.fraction is None
    assert report.n_tokens == 32 * 32
    for layer in report.layers:  # recall on held-out routed inputs; untrained from round 1
        assert layer.recall > layer.untrained_recall + 0.15
    first = [moe.selector.net[0].weight for moe in moe_layers(once)]
    second = [moe.selector.net[0].weight for moe in moe_layers(twice)]
    assert all(not torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_rounds_must_be_positive():
    with pytest.raises(MoefyError, match="rounds"):
        RouterConfig(rounds=0)
