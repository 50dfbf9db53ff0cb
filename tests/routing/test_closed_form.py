"""The closed-form routers (analytic, lstsq): scores against plain torch, fits on planted data,
costs, save / load, train_routers and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from moefy.arch.spec import FFNWeights
from moefy.cli.main import main
from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.kernels.reference import router_logits, top_k_mask
from moefy.models.load import load_model
from moefy.moe import MoEfyConfig, from_pretrained, moe_layers, moefy_, save
from moefy.moe.flops import ffn_flops_per_token
from moefy.moe.module import MoEFFN
from moefy.routing import (
    ROUTERS,
    AnalyticRouter,
    LstsqRouter,
    RouterConfig,
    set_routing,
    train_routers,
)
from tiny_models import VOCAB, WORDS, D, save_tiny_hf_folder, tiny_inputs, tiny_model

EXPERTS = 8  # of the tiny models' 64 neurons: 8 per expert
FAST = dict(tokens_per_layer=768)
# the dense FFN's activation of each tiny architecture, in plain torch
ACTIVATIONS = {"llama": Fn.silu, "gpt2": lambda v: Fn.gelu(v, approximate="tanh")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: one thread avoids oversubscription on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _blocks(n_blocks: int = 32, block_len: int = 32) -> TokenBlocks:
    gen = torch.Generator().manual_seed(0)
    return TokenBlocks(torch.randint(3, VOCAB, (n_blocks, block_len), generator=gen))


def _moe_model(arch: str = "llama"):
    model = tiny_model(arch)
    moefy_(model, MoEfyConfig(num_experts=EXPERTS, method="params"))
    return model


def _fitted(moe: MoEFFN, router_class, x: torch.Tensor, **settings):
    router = router_class.for_layer(moe, **settings)
    with torch.no_grad():
        router.fit(x, moe.expert_norms(x, dtype=torch.float32), moe)
    return router


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_analytic_scores_equal_a_plain_torch_reference_from_the_dense_weights(arch):
    moe = moe_layers(_moe_model(arch))[0]
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(1))
    router = _fitted(moe, AnalyticRouter, x, representatives=3)
    dense = moe.dense_weights()
    act = ACTIVATIONS[arch]
    expected = torch.zeros(len(x), EXPERTS)
    for e in range(EXPERTS):
        for j in router.neurons[e].tolist():
            up = x @ dense["w_up"][j] + (0 if dense["b_up"] is None else dense["b_up"][j])
            if dense["w_gate"] is not None:
                gate = x @ dense["w_gate"][j] + (
                    0 if dense["b_gate"] is None else dense["b_gate"][j]
                )
                h = act(gate) * up
            else:
                h = act(up)
            expected[:, e] += h.abs() * dense["w_down"][:, j].norm()
    assert bool((router.neurons >= 0).all()) and router.neurons.shape == (EXPERTS, 3)
    assert dense["b_up"] is not None  # both tiny models have input biases: they are copied
    with torch.no_grad():
        torch.testing.assert_close(router.scores(x, moe), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(MoefyError, match="pass moe"):
        router.scores(x)


def _planted_layer() -> MoEFFN:
    """E=3 experts of S=4 over D=16, ReLU, non-gated; expert 2 holds one real neuron. In expert
    0 neuron 2 and in expert 1 neuron 4 have down rows 50x longer than the rest."""
    gen = torch.Generator().manual_seed(3)
    F, Dm = 9, 16
    w_down = torch.randn(Dm, F, generator=gen) * 0.1
    w_down[:, 2] *= 500
    w_down[:, 4] *= 500
    weights = FFNWeights(w_up=torch.randn(F, Dm, generator=gen), w_down=w_down, act=nn.ReLU())
    slots = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, -1, -1, -1]])
    return MoEFFN.from_dense(weights, slots)


def test_representatives_are_the_best_correlated_neurons_on_a_planted_example():
    moe = _planted_layer()
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(4))
    norms = moe.expert_norms(x)  # (N, E)
    hidden = moe.expert_hidden(x)  # (N, E, S)
    down = moe.w_out.norm(dim=-1)  # (E, S)
    one = _fitted(moe, AnalyticRouter, x, representatives=1)
    assert one.neurons[:2, 0].tolist() == [2, 4]  # the dominant neurons
    two = _fitted(moe, AnalyticRouter, x, representatives=2)
    for e in range(2):  # brute force: Pearson of every neuron's contribution with the norm
        corr = [
            torch.corrcoef(torch.stack([hidden[:, e, s].abs() * down[e, s], norms[:, e]]))[0, 1]
            for s in range(4)
        ]
        best = torch.stack(corr).topk(2).indices
        assert sorted(two.neurons[e].tolist()) == sorted(moe.perm[e, best].tolist())
    assert two.neurons[2].tolist() == [8, -1]  # padding slots are never representatives
    assert float(two.rows[2, 1].abs().sum()) == 0 and float(two.down_norms[2, 1]) == 0


def test_lstsq_recovers_a_planted_linear_map():
    gen = torch.Generator().manual_seed(5)
    E, Dm = 6, 16
    weight, bias = torch.randn(E, Dm, generator=gen), torch.randn(E, generator=gen)
    x = torch.randn(400, Dm, generator=gen) * 3 + 1
    norms = x @ weight.t() + bias
    exact = LstsqRouter(E, Dm, ridge=0.0)
    exact.fit(x, norms, None)
    torch.testing.assert_close(exact.weight, weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exact.bias, bias, rtol=1e-5, atol=1e-5)
    ridged = LstsqRouter(E, Dm)  # the default ridge shrinks a little
    ridged.fit(x, norms, None)
    torch.testing.assert_close(ridged.weight, weight, rtol=0.02, atol=0.02)
    assert not torch.allclose(ridged.weight, weight, rtol=1e-5, atol=1e-5)
    # scores are non-negative masses; top-k orders by the unclamped predictions
    with torch.no_grad():
        assert bool((ridged.scores(x) >= 0).all())
        assert bool((ridged.scores(x) == (x @ ridged.weight.t() + ridged.bias).clamp_min(0)).all())


def test_shared_experts_are_neither_fitted_nor_scored_nor_counted():
    gen = torch.Generator().manual_seed(6)
    moe = moe_layers(_moe_model())[0]
    moe.num_shared = 2  # what a layer with shared experts says
    x = torch.randn(300, D, generator=gen)
    for router_class in (AnalyticRouter, LstsqRouter):
        router = _fitted(moe, router_class, x)
        assert router.unscored == 2 and router.routed == EXPERTS - 2
        with torch.no_grad():
            scores = router.scores(x, moe)
        assert scores.shape == (300, EXPERTS)
        assert bool((scores[:, :2] == 0).all()) and bool((scores[:, 2:] > 0).any())
    assert bool((router.weight[:2] == 0).all())
    analytic = _fitted(moe, AnalyticRouter, x)
    assert bool((analytic.neurons[:2] == -1).all()) and bool((analytic.neurons[2:] >= 0).all())
    assert analytic.flops_per_token(D) == (EXPERTS - 2) * 2 * (2 * (2 * D + 1) + 5)
    assert router.flops_per_token(D) == (EXPERTS - 2) * (2 * D + 2)


@pytest.mark.parametrize("router", ["analytic", "lstsq"])
def test_router_cost_is_in_the_layer_cost(router):
    model = _moe_model()
    train_routers(model, _blocks(8), RouterConfig(router=router, **FAST))
    moe = moe_layers(model)[0]
    set_routing(model, "topk", k=2)
    experts = ffn_flops_per_token(D, 2 * moe.expert_size, gated=True, in_biases=2, out_bias=True)
    own = moe.selector.flops_per_token(D)
    expected = (
        EXPERTS * 2 * (2 * (2 * D + 1) + 5) if router == "analytic" else EXPERTS * (2 * D + 2)
    )
    assert own == expected
    assert moe.flops_per_token(experts_per_token=2) == experts + own
    # the buffers are what a token reads beyond the experts
    moe.reset_tally()
    with torch.no_grad():
        model(**tiny_inputs("llama"))
    assert moe.measured_cost().weight_bytes > sum(
        b.numel() * b.element_size() for b in moe.selector.buffers()
    )


@pytest.mark.parametrize("router", ["analytic", "lstsq"])
def test_train_routers_fits_in_closed_form_and_saves(router, tmp_path):
    model = _moe_model()
    config = RouterConfig(router=router, rounds=3, **FAST)  # one fit whatever the rounds
    report = train_routers(model, _blocks(), config)
    assert report.router == router and report.n_tokens == 32 * 32
    for layer in report.layers:
        assert layer.recall > layer.random_recall + 0.2
        assert layer.norm_share <= layer.oracle_norm_share + 1e-6
        assert layer.n_train == 768 - 76 and layer.n_holdout == 76
        assert layer.final_loss != layer.final_loss  # nan: fitted, not trained
        assert layer.untrained_recall != layer.untrained_recall  # nan: nothing before the fit
    assert all(type(m.selector) is ROUTERS.get(router).value for m in moe_layers(model))
    set_routing(model, "dynamic", tau=0.8)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    save(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    for a, b in zip(moe_layers(model), moe_layers(loaded), strict=True):
        assert b.selector.to_dict() == a.selector.to_dict()
        for (name, p), (_, q) in zip(
            a.selector.state_dict().items(), b.selector.state_dict().items(), strict=True
        ):
            assert torch.equal(p, q), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)


def test_lstsq_is_one_linear_layer_for_the_fused_kernel_and_picks_the_same_experts():
    model = _moe_model()
    train_routers(model, _blocks(8), RouterConfig(router="lstsq", **FAST))
    router = moe_layers(model)[0].selector
    router.set_topk(k=3)
    k, layers = router.kernel_route()
    assert k == 3 and len(layers) == 1 and layers[0][0] is router.weight
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(7)) * 0.01  # low norms
    with torch.no_grad():
        assert torch.equal(router(x, None), top_k_mask(router_logits(x, layers), 3))
    assert AnalyticRouter(EXPERTS, D, k=3).kernel_route() is None  # not linear + ReLU


def test_bad_settings_are_one_line_errors():
    for bad in (
        lambda: RouterConfig(router="analytic", representatives=0),
        lambda: RouterConfig(router="lstsq", ridge=-1.0),
        lambda: AnalyticRouter(EXPERTS, D, representatives=0),
        lambda: train_routers(
            _moe_model(), _blocks(2), RouterConfig(router="analytic", representatives=9)
        ),
    ):
        with pytest.raises(MoefyError) as err:
            bad()
        assert len(str(err.value).splitlines()) == 1
    with pytest.raises(MoefyError, match=r"representatives=9 is more than the expert size 8"):
        AnalyticRouter.for_layer(moe_layers(_moe_model())[0], representatives=9)


def _cli_folders(tmp_path):
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
    return moe_dir, text


def _exit_code(argv: list[str]) -> int:
    """``moefy ARGV``'s exit status, argparse's usage errors (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_train_routers_cli_fits_the_analytic_router(tmp_path, capsys):
    moe_dir, text = _cli_folders(tmp_path)
    common = [
        "train-routers", "--model", str(moe_dir), "--data", str(text), "--block-len", "16",
        "--tokens", "256", "--results", str(tmp_path / "results.json"),
    ]  # fmt: skip
    argv = [*common, "--router", "analytic", "--representatives", "3", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    assert "analytic routers on 256 tokens" in capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "router_report.json").read_text())
    assert report["config"]["router"] == "analytic" and report["config"]["representatives"] == 3
    model, _ = load_model(tmp_path / "r")
    assert all(
        type(m.selector) is AnalyticRouter and m.selector.neurons.shape == (8, 3)
        for m in moe_layers(model)
    )
    for extra, named in (
        (["--router", "oracle"], "unknown router 'oracle'"),
        (["--representatives", "0"], "--representatives"),
        (["--router", "analytic", "--representatives", "99"], "representatives=99"),
    ):
        capsys.readouterr()
        assert _exit_code([*common, *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], err


def test_help_lists_every_registered_router():
    from moefy.cli.main import build_parser
    from moefy.cli.routers_cmd import BUILTIN_ROUTERS

    assert set(BUILTIN_ROUTERS) == set(ROUTERS)
    args = build_parser().parse_args(["train-routers"])
    assert args.representatives == RouterConfig().representatives  # spelled out in the CLI


def test_train_routers_fits_the_routed_experts_of_layers_with_shared_ones():
    model = _moe_model()
    for moe in moe_layers(model):
        moe.num_shared = 2
    report = train_routers(model, _blocks(8), RouterConfig(router="analytic", **FAST))
    set_routing(model, "topk", k=4)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(8))
    for moe, layer in zip(moe_layers(model), report.layers, strict=True):
        assert moe.selector.unscored == 2 and moe.selector.num_shared == 2
        assert layer.norm_share <= layer.oracle_norm_share + 1e-6
        with torch.no_grad():
            mask = moe.selector(x, moe)
        assert bool(mask[:, :2].all()) and mask.sum(-1).tolist() == [4] * 40
