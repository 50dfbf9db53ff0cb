"""Devices and dtypes: the resolver, the CLI flags, bf16 statistics, and CUDA against the CPU.

The tests marked ``gpu`` run the verbs on CUDA in fp32 and compare with the CPU; they are skipped
where torch sees no GPU.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from moefy.cli.main import main
from moefy.data.blocks import TokenBlocks
from moefy.device import resolve, resolve_device, resolve_dtype
from moefy.errors import MoefyError
from tiny_models import VOCAB, save_tiny_hf_folder, tiny_model, write_word_text

# One tolerance table per comparison: CUDA fp32 sums in another order than the CPU; bf16 rounds
# every weight and activation to 8 bits of mantissa.
TOLERANCE = {
    "cuda-fp32": {"atol": 1e-4, "rtol": 1e-4},
    "bf16": {"atol": 2e-2, "rtol": 2e-2},
}
# bf16 moves neurons near an "active" cut-off across it: shares may differ by this much.
BF16_SHARE_TOLERANCE = 0.05
BF16_PERPLEXITY_RTOL = 0.02

# Every command that loads or runs a model, with the arguments it needs besides --model/--data.
MODEL_COMMANDS = {
    "profile": [],
    "convert": [],
    "splits": ["--methods", "random"],
    "train-routers": [],
    "sparsify": [],
    "evaluate": [],
    "sweep": [],
    "generate": ["--prompt", "hi"],
    "layers": [],
    "drop": ["--skip", "1"],
}
NO_DATA = ("convert", "generate")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def no_cuda(monkeypatch):
    """Pretend torch sees no GPU, so the tests behave the same on a GPU machine."""
    monkeypatch.setattr("moefy.device.cuda_available", lambda: False)


def _blocks(num_blocks: int = 8, block_len: int = 16, seed: int = 0) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    return TokenBlocks(torch.randint(3, VOCAB, (num_blocks, block_len), generator=gen))


# ------------------------------------------------------------------------------- the resolver


def test_auto_without_cuda_is_cpu_fp32(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve("auto", "auto") == (torch.device("cpu"), torch.float32)


def test_auto_dtype_is_bf16_on_cuda_and_names_resolve():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto") == torch.float32  # no device: the CPU
    for spec, dtype in [
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("bfloat16", torch.bfloat16),
        (" FP16 ", torch.float16),
        (torch.float64, torch.float64),
    ]:
        assert resolve_dtype(spec, "cpu") == dtype
    assert resolve("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)


def test_cuda_where_there_is_none_is_a_one_line_error(no_cuda):
    for spec in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(MoefyError, match="CUDA was asked for") as info:
            resolve_device(spec)
        assert "\n" not in str(info.value) and "--device cpu" in str(info.value)


@pytest.mark.parametrize("spec", ["tpu", "gpu", "cuda:x", "", 3])
def test_unknown_device_is_an_error(spec):
    with pytest.raises(MoefyError, match="device"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["int8", "fp8", "half-ish", torch.int8, 16])
def test_unknown_or_integer_dtype_is_an_error(spec):
    with pytest.raises(MoefyError, match="dtype"):
        resolve_dtype(spec, "cpu")


def test_bare_cuda_under_torchrun_is_the_local_gpu(monkeypatch):
    monkeypatch.setattr("moefy.device.cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(MoefyError, match="no GPU cuda:5"):
        resolve_device("cuda:5")


# ------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    return root, save_tiny_hf_folder(root / "tiny"), write_word_text(root / "text.jsonl")


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_every_model_command_has_the_flags(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--device" in text and "--dtype" in text


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_device_cuda_without_cuda_exits_2_with_one_line(
    command, workspace, no_cuda, capsys, tmp_path, monkeypatch
):
    root, model_dir, text = workspace
    monkeypatch.chdir(tmp_path)  # default output folders land here: nothing may be written
    argv = [command, "--model", str(model_dir), *MODEL_COMMANDS[command], "--device", "cuda"]
    if command not in NO_DATA:
        argv += ["--data", str(text)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"moefy {command}: error: CUDA was asked for" in err
    assert not any(tmp_path.iterdir())


def test_unknown_device_or_dtype_is_a_usage_error(capsys):
    for flags in (["--device", "tpu"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit) as info:
            main(["profile", *flags])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "see 'moefy profile --help'" in err


def test_bf16_on_cpu_profile_convert_evaluate_close_to_fp32(workspace):
    """The same pipeline in fp32 and bf16 on the CPU: statistics float64, figures close."""
    from moefy.models.load import load_model
    from moefy.moe import moe_layers
    from moefy.profiling import SparsityProfile

    root, model_dir, text = workspace
    common = ["--model", str(model_dir), "--data", str(text), "--block-len", "16"]
    results = {}
    for dtype in ("fp32", "bf16"):
        out = root / dtype
        assert (
            main(
                [
                    "profile",
                    *common,
                    "--tokens",
                    "256",
                    "--coactivation",
                    "--no-plots",
                    "--dtype",
                    dtype,
                    "--out",
                    str(out / "profile"),
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "convert",
                    "--model",
                    str(model_dir),
                    "--experts",
                    "8",
                    "--dtype",
                    dtype,
                    "--out",
                    str(out / "moe"),
                ]
            )
            == 0
        )
        report = out / "eval.json"
        assert (
            main(
                [
                    "evaluate",
                    *common,
                    "--model",
                    str(out / "moe"),
                    "--tokens",
                    "224",
                    "--dtype",
                    dtype,
                    "--out",
                    str(report),
                ]
            )
            == 0
        )
        moe, _ = load_model(out / "moe", dtype=dtype)
        assert {m.w_in.dtype for m in moe_layers(moe)} == {resolve_dtype(dtype)}
        results[dtype] = (
            SparsityProfile.load(out / "profile"),
            json.loads(report.read_text())["row"]["perplexity"],
        )
    (profile32, ppl32), (profile16, ppl16) = results["fp32"], results["bf16"]
    for layer in range(profile32.num_layers):
        for name, total in profile16.sums(layer).items():
            assert total.dtype == torch.float64, name
        assert profile16.coactivation(layer).dtype == torch.float64
        a, b = profile32.layers[layer], profile16.layers[layer]
        assert abs(a.active_fraction - b.active_fraction) < BF16_SHARE_TOLERANCE
        assert abs(a.rms - b.rms) / a.rms < TOLERANCE["bf16"]["rtol"]
        co32, co16 = profile32.coactivation(layer), profile16.coactivation(layer)
        assert (co32 - co16).abs().sum() / co32.sum() < BF16_SHARE_TOLERANCE
    assert ppl16 == pytest.approx(ppl32, rel=BF16_PERPLEXITY_RTOL)


# ------------------------------------------------------------------------------- bf16 statistics


def test_router_targets_and_calibration_histograms_are_fp32_or_wider_for_bf16():
    """Router targets (float32) and threshold histograms (float64) of a bf16 model, close to the
    fp32 model's."""
    from moefy.moe import MoEfyConfig, moe_layers, moefy_
    from moefy.routing import RouterConfig
    from moefy.routing.train import _collect
    from moefy.sparsify import TEALConfig, sparsify_

    blocks = _blocks()
    dense = tiny_model("llama")
    moefy_(dense, MoEfyConfig(num_experts=8, method="random"))
    half = copy.deepcopy(dense).to(torch.bfloat16)
    config = RouterConfig(tokens_per_layer=blocks.num_blocks * blocks.block_len)
    targets = {}
    for name, model in (("fp32", dense), ("bf16", half)):
        reservoirs = _collect(
            model, blocks, moe_layers(model), config, dense=True, show=False, desc=""
        )
        assert all(r.targets.dtype == torch.float32 for r in reservoirs)
        targets[name] = torch.cat([r.targets for r in reservoirs])
    # log norms: an absolute tolerance on them is a relative one on the norms
    gap = (targets["bf16"] - targets["fp32"]).abs()
    assert float(gap.mean()) < TOLERANCE["bf16"]["rtol"], float(gap.mean())

    thresholds = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = tiny_model("llama").to(dtype)
        # no greedy search: its discrete choices may differ; the quantiles must not
        teal = TEALConfig(sparsity=0.5, min_calibration_tokens=64, greedy=False)
        report = sparsify_(model, teal, blocks)
        histograms = report.calibration.histograms.values()
        assert all(h.dtype == torch.float64 for h in histograms)
        thresholds[name] = torch.tensor([a.criterion_threshold for a in report.allocations])
    torch.testing.assert_close(thresholds["bf16"], thresholds["fp32"], **TOLERANCE["bf16"])


# ------------------------------------------------------------------------------- CUDA


def _verbs_on(device: torch.device) -> dict[str, object]:
    """Profile, convert, train routers, evaluate and sparsify a tiny model on ``device``."""
    from moefy.eval import EvalConfig, evaluate
    from moefy.moe import MoEfyConfig, moe_layers, moefy_, set_selection
    from moefy.profiling import ProfileConfig, profile
    from moefy.routing import RouterConfig, train_routers
    from moefy.sparsify import TEALConfig, sparsify_

    blocks = _blocks(num_blocks=16)
    model = tiny_model("llama").to(device)
    out: dict[str, object] = {}
    result = profile(model, blocks, ProfileConfig(batch_size=4, coactivation=True))
    out["active"] = torch.tensor([layer.active_fraction for layer in result.layers])
    out["coactivation"] = result.coactivation(0)
    moefy_(model, MoEfyConfig(num_experts=8, method="params"), progress=False)
    out["perm"] = torch.stack([m.perm.cpu() for m in moe_layers(model)])
    evaluation = EvalConfig(tokens=256, block_len=16, batch_size=4)
    out["moe_ppl"] = evaluate(model, evaluation, blocks=blocks).lm.perplexity
    train_routers(model, blocks, RouterConfig(epochs=2, tokens_per_layer=256, seed=0))
    set_selection(model, fraction=0.5)
    out["routed_ppl"] = evaluate(model, evaluation, blocks=blocks).lm.perplexity
    dense = tiny_model("llama").to(device)
    report = sparsify_(dense, TEALConfig(sparsity=0.5, min_calibration_tokens=64), blocks)
    out["thresholds"] = torch.tensor([a.criterion_threshold for a in report.allocations])
    out["sparse_ppl"] = evaluate(dense, evaluation, blocks=blocks).lm.perplexity
    assert all(p.device.type == device.type for p in model.parameters())
    return out


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp32_matches_cpu():
    cpu, cuda = _verbs_on(torch.device("cpu")), _verbs_on(torch.device("cuda"))
    torch.testing.assert_close(cuda["active"], cpu["active"], atol=0.01, rtol=0)
    co_cpu, co_cuda = cpu["coactivation"], cuda["coactivation"]
    assert float((co_cuda - co_cpu).abs().sum() / co_cpu.sum()) < 0.01
    assert torch.equal(cuda["perm"], cpu["perm"])  # the same seeded split
    torch.testing.assert_close(cuda["thresholds"], cpu["thresholds"], **TOLERANCE["cuda-fp32"])
    for key in ("moe_ppl", "sparse_ppl"):
        assert cuda[key] == pytest.approx(cpu[key], rel=TOLERANCE["cuda-fp32"]["rtol"])
    # routers train from the same seeded sample; float sums in another order move them slightly
    assert cuda["routed_ppl"] == pytest.approx(cpu["routed_ppl"], rel=0.01)


@pytest.mark.gpu
@needs_cuda
def test_cli_runs_on_cuda(workspace):
    root, model_dir, text = workspace
    common = ["--model", str(model_dir), "--data", str(text), "--block-len", "16"]
    for dtype in ("fp32", "bf16"):
        out = root / f"cuda-{dtype}"
        flags = ["--device", "cuda", "--dtype", dtype]
        assert main(["profile", *common, "--tokens", "256", "--no-plots", *flags,
                     "--out", str(out / "profile")]) == 0  # fmt: skip
        assert main(["convert", "--model", str(model_dir), "--experts", "8", *flags,
                     "--out", str(out / "moe")]) == 0  # fmt: skip
        assert main(["train-routers", *common, "--model", str(out / "moe"), "--tokens", "256",
                     "--epochs", "1", *flags, "--out", str(out / "routed"),
                     "--results", str(out / "results.json")]) == 0  # fmt: skip
        assert main(["sparsify", *common, "--tokens", "1024", "--eval-tokens", "224", *flags,
                     "--out", str(out / "sparse")]) == 0  # fmt: skip
        assert main(["evaluate", *common, "--model", str(out / "routed"), "--tokens", "224",
                     *flags]) == 0  # fmt: skip
        assert main(["sweep", *common, "--tokens", "224", "--agreement-tokens", "64",
                     "--methods", "dense,moe-oracle,teal", "--levels", "0.5",
                     "--calibration-tokens", "1024", "--experts", "8", *flags,
                     "--out", str(out / "sweep")]) == 0  # fmt: skip
