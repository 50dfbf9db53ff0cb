"""MoE-aware fine-tuning: the routed training forward equals inference, gradients reach only what
ran, the router loss trains routers only, the efficiency term concentrates expert mass, and the
CLI trains, saves and loads a moefied model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.finetune import FinetuneConfig, finetune
from moefy.finetune.moe_aware import (
    RoutedTraining,
    all_experts_teacher,
    efficiency_penalty,
    router_hits,
    router_loss,
)
from moefy.moe import MoEfyConfig, moe_layers, moefy_
from moefy.routing import RouterConfig, attach_routers, set_routing, train_routers
from tiny_models import VOCAB, tiny_model

E = 8


def _blocks(n_blocks: int = 16, block_len: int = 16, seed: int = 0) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(3, VOCAB, (n_blocks, 1), generator=gen)
    ids = (starts + torch.arange(block_len)) % (VOCAB - 3) + 3
    return TokenBlocks(ids, "counting", "calibration")


def _routed(router: str = "mlp", *, trained: bool = True, fraction: float = 0.5, seed: int = 0):
    torch.manual_seed(seed)
    model = tiny_model("llama", seed=seed)
    moefy_(model, MoEfyConfig(num_experts=E, method="random"))
    if trained:
        config = RouterConfig(router=router, hidden=16, tokens_per_layer=256, epochs=4)
        train_routers(model, _blocks(seed=seed + 1), config)
    else:
        attach_routers(model, router, hidden=16)
    set_routing(model, "topk", fraction=fraction)
    return model


@pytest.fixture(scope="module")
def tiny_text_and_moe(tmp_path_factory):
    """A BPE-free tiny text, and a tiny llama folder moefied (8 experts) with mlp routers."""
    from moefy.cli.main import main
    from tiny_models import WORDS, save_tiny_hf_folder

    root = tmp_path_factory.mktemp("moe-aware")
    dense = save_tiny_hf_folder(root / "dense")
    text = root / "text.jsonl"
    text.write_text(
        "".join(json.dumps({"text": " ".join(WORDS[i:] + WORDS[:i]) * 3}) + "\n" for i in range(60))
    )
    assert (
        main(["convert", "--model", str(dense), "--experts", "8", "--out", str(root / "moe")]) == 0
    )
    argv = [
        "train-routers", "--model", str(root / "moe"), "--data", str(text), "--block-len", "16",
        "--tokens", "256", "--epochs", "2", "--hidden", "16", "--eval-tokens", "0",
        "--out", str(root / "routed"),
    ]  # fmt: skip
    assert main(argv) == 0
    return text, root / "routed"


def _lm_loss(model, data: TokenBlocks) -> float:
    with torch.no_grad():
        logits = model(input_ids=data.input_ids, use_cache=False).logits
    return float(
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), data.input_ids[:, 1:].reshape(-1)
        )
    )


@pytest.mark.parametrize("rule", ["topk", "dynamic"])
def test_routed_training_forward_equals_inference(rule):
    model, ids = _routed(), _blocks().input_ids[:4]
    if rule == "dynamic":
        set_routing(model, "dynamic", tau=0.7)
    with torch.no_grad():
        inference = model(input_ids=ids, use_cache=False).logits
        with RoutedTraining(model) as routed:
            training = model(input_ids=ids, use_cache=False).logits
            records = routed.take()
    torch.testing.assert_close(training, inference, rtol=1e-5, atol=1e-5)
    assert len(records) == len(moe_layers(model))
    shares = [float(r.mask.float().mean()) for r in records]
    if rule == "topk":
        assert all(share == pytest.approx(0.5) for share in shares)
    else:
        assert all(0 < share < 1 for share in shares)
    assert all(r.predicted_log_norms is not None for r in records)
    assert all(m._training_records is None for m in moe_layers(model))  # closed


def test_all_experts_teacher_is_the_dense_model():
    dense = tiny_model("llama", seed=0)
    model = _routed()
    teacher = all_experts_teacher(model)
    ids = _blocks().input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(
            teacher(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    assert not any(p.requires_grad for p in teacher.parameters())


def test_gradients_reach_only_the_experts_that_ran_and_router_loss_only_routers():
    model = _routed(fraction=0.25)
    ids = _blocks().input_ids[:1, :3]  # 3 tokens x 2 experts each: most experts never run
    with RoutedTraining(model) as routed:
        logits = model(input_ids=ids, use_cache=False).logits
        records = routed.take()
    logits.float().square().mean().backward(retain_graph=True)
    for moe, record in zip(moe_layers(model), records, strict=True):
        ran = record.mask.any(dim=0)  # (E,)
        assert 0 < int(ran.sum()) < E
        grad_norm = moe.w_out.grad.flatten(1).norm(dim=1)  # (E,)
        assert bool((grad_norm[~ran] == 0).all()) and bool((grad_norm[ran] > 0).all())
        assert all(p.grad is None for p in moe.selector.parameters())  # LM loss: not the router
    model.zero_grad(set_to_none=True)
    router_loss(records).backward()
    for name, param in model.named_parameters():
        if ".selector." in name:
            assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
        else:
            assert param.grad is None or float(param.grad.abs().sum()) == 0, name


def test_router_in_the_loop_learns_to_find_the_experts():
    data = _blocks(32)
    model = _routed(trained=False, fraction=0.25)
    config = FinetuneConfig(
        max_steps=60, lr=1e-2, warmup_steps=0, batch_size=4, reg="none", log_every=1
    )
    report = finetune(model, data, config)
    first, last = report.history[0], report.history[-1]
    assert last["router_loss"] < first["router_loss"] - 0.05
    assert last["router_recall"] > first["router_recall"] + 0.05
    assert last["active_experts"] == pytest.approx(0.25)
    assert last["lm_loss"] < first["lm_loss"]


def test_routed_training_lowers_the_routed_loss_and_efficiency_concentrates_mass():
    data = _blocks(32)
    base = dict(max_steps=40, lr=3e-3, warmup_steps=0, batch_size=4, reg="none", log_every=1)
    before = _lm_loss(_routed(fraction=0.25), data)
    plain, efficient = _routed(fraction=0.25), _routed(fraction=0.25)
    finetune(plain, data, FinetuneConfig(**base))
    report = finetune(efficient, data, FinetuneConfig(**base, efficiency=2.0))
    assert _lm_loss(plain, data) < before - 0.1
    assert report.history[-1]["efficiency"] < report.history[0]["efficiency"]

    def hoyer(model) -> float:
        set_routing(model, "topk", fraction=1.0)
        with torch.no_grad(), RoutedTraining(model) as routed:
            model(input_ids=data.input_ids, use_cache=False)
            return float(efficiency_penalty(routed.take()))

    assert hoyer(efficient) < hoyer(plain) - 0.02


def test_errors_for_efficiency_on_a_dense_model():
    with pytest.raises(MoefyError, match="moefied models"):
        finetune(tiny_model("llama"), _blocks(), FinetuneConfig(max_steps=1, efficiency=0.1))
    with pytest.raises(MoefyError, match="router_loss"):
        FinetuneConfig(max_steps=1, router_loss=-1.0)


def _finetune_argv(routed_dir, text, out, *extra: str) -> list[str]:
    """``moefy finetune`` of the tiny routed folder on the tiny text (distillation on, no
    regulariser), with ``extra`` flags."""
    return [
        "finetune", "--model", str(routed_dir), "--data", str(text), "--block-len", "16",
        "--tokens", "512", "--batch-size", "4", "--reg", "none", "--distill", "1",
        "--out", str(out), *extra,
    ]  # fmt: skip


def test_cli_trains_saves_and_loads_a_moefied_model(tmp_path, tiny_text_and_moe):
    from moefy.cli.main import main
    from moefy.models.load import load_model
    from moefy.routing import MLPRouter

    text, routed_dir = tiny_text_and_moe
    out = tmp_path / "ft"
    extra = ["--steps", "4", "--fraction", "0.5", "--efficiency", "0.5", "--eval-tokens", "128"]
    assert main(_finetune_argv(routed_dir, text, out, *extra)) == 0
    summary = json.loads((out / "finetune_report.json").read_text())
    assert summary["moe_aware"] is True
    assert summary["before"]["active_experts"] == pytest.approx(0.5)
    assert summary["after"]["active_experts"] == pytest.approx(0.5)
    assert summary["report"]["history"][-1]["efficiency"] > 0
    model, _ = load_model(out)
    layers = moe_layers(model)
    assert layers and all(type(m.selector) is MLPRouter for m in layers)
    assert all(m.selector.fraction == 0.5 for m in layers)
    assert not list(out.glob(".model-*"))  # no temporary folder left behind


def test_cli_errors_for_moe_flags_on_dense_and_relufy_on_moefied(
    tmp_path, tiny_text_and_moe, capsys
):
    from moefy.cli.main import main

    text, routed_dir = tiny_text_and_moe
    common = ["--data", str(text), "--block-len", "16", "--tokens", "512", "--steps", "1"]
    dense_dir = routed_dir.parent / "dense"
    assert main(["finetune", "--model", str(dense_dir), *common, "--fraction", "0.5",
                 "--out", str(tmp_path / "a")]) == 2  # fmt: skip
    assert "--fraction apply to moefied models" in capsys.readouterr().err
    assert main(["finetune", "--model", str(dense_dir), *common, "--train", "routers",
                 "--straight-through", "0.5", "--out", str(tmp_path / "c")]) == 2  # fmt: skip
    assert "--straight-through, --train apply to moefied models" in capsys.readouterr().err
    assert main(["finetune", "--model", str(routed_dir), *common, "--relufy",
                 "--out", str(tmp_path / "b")]) == 2  # fmt: skip
    assert "relufy the dense model" in capsys.readouterr().err


def _two_rank_worker(rank: int, out_dir: str) -> None:
    model = _routed(fraction=0.25)
    config = FinetuneConfig(max_steps=3, batch_size=2, reg="none", efficiency=0.5, log_every=1)
    report = finetune(model, _blocks(), config)
    torch.save({"state": model.state_dict(), "history": report.history}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_two_processes_train_one_moefied_model(tmp_path):
    from gloo import spawn

    spawn(_two_rank_worker, str(tmp_path))
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert zero["history"] == one["history"]  # logged figures are summed over both ranks
    start = _routed(fraction=0.25).state_dict()
    for name, tensor in zero["state"].items():
        torch.testing.assert_close(tensor, one["state"][name], rtol=0, atol=0, msg=name)
    changed = [n for n, t in zero["state"].items() if not torch.equal(t, start[n])]
    assert any(".selector." in n for n in changed) and any("w_in" in n for n in changed)


def test_efficiency_stays_finite_where_relu_experts_output_zero():
    from moefy.finetune import relufy_

    torch.manual_seed(0)
    model = tiny_model("llama", seed=0)
    relufy_(model)
    moefy_(model, MoEfyConfig(num_experts=16, method="random"))  # 2-neuron experts: often all 0
    attach_routers(model, "mlp", hidden=8)
    set_routing(model, "topk", fraction=0.5)
    with torch.no_grad(), RoutedTraining(model) as routed:
        model(input_ids=_blocks().input_ids[:4], use_cache=False)
        assert any(bool((r.norms <= 1e-6).any()) for r in routed.take())  # the case is built
    config = FinetuneConfig(max_steps=3, batch_size=4, reg="none", efficiency=1.0, log_every=1)
    report = finetune(model, _blocks(), config)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in report.history)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_router_lr_moves_the_routers_not_the_experts():
    model = _routed(trained=False, fraction=0.25)
    start = {n: t.clone() for n, t in model.state_dict().items()}
    config = FinetuneConfig(
        max_steps=8, lr=1e-7, router_lr=1e-2, warmup_steps=0, batch_size=4, reg="none"
    )
    finetune(model, _blocks(), config)
    moved = {n: float((t - start[n]).abs().max()) for n, t in model.state_dict().items()}
    assert min(v for n, v in moved.items() if ".selector." in n and "weight" in n) > 1e-3
    assert max(v for n, v in moved.items() if ".selector." not in n) < 1e-4
    with pytest.raises(MoefyError, match="router_lr"):
        FinetuneConfig(max_steps=1, router_lr=0.0)


def test_router_hits_count_the_true_best_among_the_chosen():
    from moefy.moe.module import ExpertTrainingRecord

    norms = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    record = ExpertTrainingRecord(norms, torch.zeros(2, 4), mask)
    assert router_hits([record]) == (2, 3)  # token 0: 1 of its true top-2; token 1: its best
    assert router_hits([ExpertTrainingRecord(norms, None, mask)]) == (0, 0)  # no router


def test_straight_through_gates_equal_the_mask_and_pass_gradient_at_the_boundary():
    from moefy.moe.module import straight_through_gates

    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    gates = straight_through_gates(scores, mask, temperature=0.5)
    assert torch.equal(gates, mask.float())
    (gates * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    grad = scores.grad
    assert bool((grad[0] > 0).all())  # raising any score raises its gate
    assert grad[0, 1] > grad[0, 0] and grad[0, 2] > grad[0, 3]  # most where the boundary is
    assert bool((grad[1] == 0).all())  # every expert selected: no boundary, no gradient


def test_straight_through_lets_the_lm_loss_reach_the_routers():
    model, ids = _routed(fraction=0.25), _blocks().input_ids[:2, :6]
    with torch.no_grad():
        inference = model(input_ids=ids, use_cache=False).logits
    with RoutedTraining(model, straight_through=0.5) as routed:
        logits = model(input_ids=ids, use_cache=False).logits
        assert len(routed.take()) == len(moe_layers(model))
    torch.testing.assert_close(logits, inference, rtol=1e-5, atol=1e-5)  # still hard selection
    logits.float().square().mean().backward()
    for moe in moe_layers(model):
        assert all(float(p.grad.abs().sum()) > 0 for p in moe.selector.parameters())
    with pytest.raises(MoefyError, match="temperature"):
        moe_layers(model)[0].record_training([], straight_through=0.0)


def test_training_routers_only_end_to_end_moves_only_routers_and_beats_the_oracle():
    from moefy.moe.selectors import OracleSelector

    data = _blocks(4)  # one batch, trained on and scored on: the fit shows, not generalisation
    model = _routed(trained=False, fraction=0.25)
    with torch.no_grad():
        for moe in moe_layers(model):
            moe.w_out.mul_(30.0)  # FFNs that matter to the loss, so the selection does too
    oracle = copy.deepcopy(model)
    for moe in moe_layers(oracle):
        moe.selector = OracleSelector(E, fraction=0.25)
    start = {n: t.clone() for n, t in model.state_dict().items()}
    before = _lm_loss(model, data)
    config = FinetuneConfig(
        max_steps=40, lr=1e-2, warmup_steps=0, batch_size=4, reg="none", router_loss=0.0,
        straight_through=0.5, train="routers",
    )  # fmt: skip
    finetune(model, data, config)
    moved = {n: float((t - start[n]).abs().max()) for n, t in model.state_dict().items()}
    assert min(v for n, v in moved.items() if ".selector." in n and "weight" in n) > 1e-3
    assert max(v for n, v in moved.items() if ".selector." not in n) == 0.0
    assert all(p.requires_grad for p in model.parameters())  # given back after training
    # the language-model loss alone, through the straight-through gates, taught the routers
    # a selection better for it than the experts' norms (the oracle's choice) on this batch
    assert _lm_loss(model, data) < min(before, _lm_loss(oracle, data)) - 0.01


def test_errors_for_router_only_training_settings():
    from moefy.moe.selectors import OracleSelector

    with pytest.raises(MoefyError, match="moefied model"):
        finetune(tiny_model("llama"), _blocks(), FinetuneConfig(max_steps=1, train="routers"))
    with pytest.raises(MoefyError, match="moefied model"):
        finetune(tiny_model("llama"), _blocks(), FinetuneConfig(max_steps=1, straight_through=1.0))
    with pytest.raises(MoefyError, match="temperature"):
        FinetuneConfig(max_steps=1, straight_through=0.0)
    with pytest.raises(MoefyError, match="train must be"):
        FinetuneConfig(max_steps=1, train="experts")
    with pytest.raises(MoefyError, match="trains nothing"):
        FinetuneConfig(max_steps=1, train="routers", router_loss=0.0)
    model = _routed(fraction=0.25)
    for moe in moe_layers(model):
        moe.selector = OracleSelector(E, fraction=0.25)
    with pytest.raises(MoefyError, match="nothing to train"):
        finetune(model, _blocks(), FinetuneConfig(max_steps=1, train="routers"))
    assert all(p.requires_grad for p in model.parameters())


def test_cli_trains_the_routers_only_end_to_end(tmp_path, tiny_text_and_moe):
    from moefy.cli.main import main
    from moefy.models.load import load_model

    text, routed_dir = tiny_text_and_moe
    out = tmp_path / "routers"
    extra = [
        "--steps", "3", "--fraction", "0.25", "--train", "routers", "--straight-through", "0.5",
        "--lr", "1e-2", "--eval-tokens", "0",
    ]  # fmt: skip
    assert main(_finetune_argv(routed_dir, text, out, *extra)) == 0
    summary = json.loads((out / "finetune_report.json").read_text())
    assert summary["report"]["config"]["train"] == "routers"
    before, after = load_model(routed_dir)[0].state_dict(), load_model(out)[0].state_dict()
    changed = {n for n, t in after.items() if not torch.equal(t, before[n])}
    assert changed and all(".selector." in n for n in changed)
