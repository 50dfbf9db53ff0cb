"""Centring (SCAP): the mode/median/mean estimators on data with known answers, the centred
wrappers (exact when nothing is dropped, the kernel path equal to the masked one), the methods
that take ``centre`` (scap, teal, wina, topk), save/load, reuse, unsparsify and the errors."""

from __future__ import annotations

import pytest
import torch

from moefy.cli.main import main
from moefy.errors import MoefyError
from moefy.kernels import use_backend
from moefy.sparsify import (
    TEALConfig,
    TopKConfig,
    WINAConfig,
    config_from_dict,
    load_sparse,
    measure,
    save_sparse,
    sparsify_,
    unsparsify,
)
from moefy.sparsify.centring import (
    CentredThresholdLinear,
    CentredTopKLinear,
    ChannelHistogram,
    ChannelMoments,
    fit_centres,
)
from moefy.sparsify.methods import handler_for
from moefy.sparsify.methods.scap import SCAPConfig
from moefy.sparsify.wrappers import ThresholdLinear, sparse_modules
from tiny_models import save_tiny_hf_folder, tiny_inputs, tiny_model

EXACT = {"rtol": 0.0, "atol": 0.0}
FAST = {"min_calibration_tokens": 1, "calibration_passes": 1}


def _logits(model, name="llama"):
    with torch.no_grad():
        return model(**tiny_inputs(name))[0]


def _centred(model):
    return [w for _, w in sparse_modules(model) if hasattr(w, "centre")]


# ---------------------------------------------------------------------------------------------
# estimators


def _known_channels(n: int = 40_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4) values whose modes are known, and those modes: a shifted Gamma(2, 1) (mode 0.3,
    mean 1.3), a normal, a Laplace and a 70/30 mixture whose mean is far from its mode."""
    torch.manual_seed(0)
    gamma = torch.distributions.Gamma(torch.tensor(2.0), torch.tensor(1.0)).sample((n,)) - 0.7
    normal = torch.randn(n) - 1.0
    laplace = torch.distributions.Laplace(0.5, 0.1).sample((n,))
    major = torch.rand(n) < 0.7
    mixture = torch.where(major, torch.randn(n) * 0.2 + 2.0, torch.randn(n) - 1.0)
    return torch.stack([gamma, normal, laplace, mixture], 1), torch.tensor([0.3, -1.0, 0.5, 2.0])


def test_mode_median_and_mean_estimators_find_the_known_values():
    values, modes = _known_channels()
    moments = ChannelMoments(values.shape[1])
    for chunk in values.split(4096):  # streamed in pieces, as calibration does
        moments.add(chunk)
    histogram = ChannelHistogram(moments.mean(), moments.std())
    for chunk in values.split(4096):
        histogram.add(chunk)
    torch.testing.assert_close(moments.mean().float(), values.mean(0), rtol=0, atol=1e-4)
    torch.testing.assert_close(histogram.median().float(), values.median(0).values, **_BIN)
    # a smooth peak fixes its mode only to ~n ** (-2 / 7) standard deviations; sharp ones closer
    torch.testing.assert_close(histogram.mode().float(), modes, rtol=0, atol=0.1)
    assert float((histogram.mode()[2] - 0.5).abs()) < 0.01  # the Laplace peak
    # the mixture's and the Gamma's mean and median are far from their modes: the test can fail
    assert (moments.mean().float() - modes).abs()[[0, 3]].min() > 0.8


_BIN = {"rtol": 0.0, "atol": 0.02}  # a fraction of a bin (8 / 256 of a standard deviation)


def test_a_constant_channel_has_its_value_as_every_centre():
    values = torch.full((100, 1), 0.25)
    moments = ChannelMoments(1)
    moments.add(values)
    histogram = ChannelHistogram(moments.mean(), moments.std())
    histogram.add(values)
    for estimate in (histogram.mode(), histogram.median(), moments.mean()):
        assert float(estimate) == pytest.approx(0.25, abs=1e-6)


def test_fit_centres_reads_the_raw_inputs_without_the_sink_positions(small_blocks):
    model = tiny_model("llama")
    config = TEALConfig(centre="mean")
    wrapped = [wrapper for _, wrapper in handler_for(config).install(model, config)]
    assert len(wrapped) == 6  # gate, up, down of two blocks
    seen = []
    handle = wrapped[2].base_layer.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0][:, 4:].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        model(input_ids=small_blocks.input_ids)
    handle.remove()
    expected = torch.cat(seen).double().mean(0).float()
    got = fit_centres(model, wrapped, small_blocks, centre="mean", sink_positions=4)
    torch.testing.assert_close(got[2], expected, rtol=0, atol=1e-5)
    with_sinks = fit_centres(model, wrapped, small_blocks, centre="mean", sink_positions=0)
    assert not torch.allclose(with_sinks[2], expected, atol=1e-5)


def test_the_moments_pass_reads_the_leading_tokens_and_the_histogram_pass_all(
    calibration_blocks, monkeypatch
):
    from moefy.sparsify import centring

    monkeypatch.setattr(centring, "MOMENT_TOKENS", 100)  # 4 blocks of 32
    model = tiny_model("llama")
    config = TEALConfig(centre="median")
    wrapped = [wrapper for _, wrapper in handler_for(config).install(model, config)]
    rows = {"moments": 0, "histogram": 0}
    moments_add, histogram_add = centring.ChannelMoments.add, centring.ChannelHistogram.add

    def count(kind, add):
        def counted(self, values):
            rows[kind] += values.shape[0]
            return add(self, values)

        return counted

    monkeypatch.setattr(centring.ChannelMoments, "add", count("moments", moments_add))
    monkeypatch.setattr(centring.ChannelHistogram, "add", count("histogram", histogram_add))
    fit_centres(model, wrapped, calibration_blocks, centre="median", sink_positions=0)
    assert rows["moments"] == 4 * 32 * len(wrapped)
    assert rows["histogram"] == calibration_blocks.n_tokens * len(wrapped)


# ---------------------------------------------------------------------------------------------
# the wrappers


def test_centred_threshold_linear_is_w_times_sparse_centred_input_plus_w_centre():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    layer = CentredThresholdLinear(base, layer=0, role="up_proj")
    centre = torch.randn(16) * 0.5
    layer.set_centre(centre)
    layer.threshold.fill_(0.4)
    x = torch.randn(3, 5, 16)
    centred = x - centre
    kept = centred.masked_fill(centred.abs() <= 0.4, 0.0)
    expected = kept @ base.weight.T + base.bias + base.weight @ centre
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert int(layer.zeros_seen) == int((kept == 0).sum())
    torch.testing.assert_close(layer.centre_bias, base.weight.detach() @ centre)
    seen = []
    handle = layer.observe(seen.append)
    layer(x)
    handle.remove()
    torch.testing.assert_close(seen[0], centred)  # the histograms see the centred input


def test_zero_thresholds_give_the_base_layer_exactly_and_count_entries_at_the_centre():
    base = torch.nn.Linear(4, 3)
    layer = CentredThresholdLinear(base, layer=0, role="down_proj")
    layer.set_centre(torch.tensor([0.5, 0.0, -1.0, 2.0]))
    x = torch.tensor([[0.5, 1.0, -1.0, 3.0]])  # two entries sit at their centre
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x), **EXACT)
    assert int(layer.zeros_seen) == 2


def test_the_decode_kernel_equals_the_masked_path():
    torch.manual_seed(0)
    layer = CentredThresholdLinear(torch.nn.Linear(64, 32), layer=0, role="up_proj")
    layer.set_centre(torch.randn(64) * 0.3)
    layer.threshold.fill_(0.5)
    x = torch.randn(1, 1, 64)  # decode-sized: the kernel runs
    with torch.no_grad(), use_backend("reference"):
        expected = layer(x)
        expected_zeros = int(layer.zeros_seen)
    layer.reset_counters()
    with torch.no_grad(), use_backend("cpu"):
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert int(layer.zeros_seen) == expected_zeros > 0


def test_centred_top_k_keeps_the_k_largest_centred_entries():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 4)
    layer = CentredTopKLinear(base, layer=0, role="down_proj", k=3)
    centre = torch.randn(8)
    layer.set_centre(centre)
    x = torch.randn(5, 8)
    centred = x - centre
    top = centred.abs().topk(3, dim=-1).indices
    kept = torch.zeros_like(centred).scatter(-1, top, centred.gather(-1, top))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(kept) + base.weight @ centre)
    assert int(layer.zeros_seen) == 5 * 5


# ---------------------------------------------------------------------------------------------
# the methods

CENTRED = [
    ("scap", lambda s: SCAPConfig(sparsity=s, greedy_tokens=64, **FAST)),
    (
        "scap-median-attn",
        lambda s: SCAPConfig(sparsity=s, centre="median", attention=True, greedy=False, **FAST),
    ),
    ("teal-mean", lambda s: TEALConfig(sparsity=s, centre="mean", greedy=False, **FAST)),
    ("wina-mode", lambda s: WINAConfig(sparsity=s, centre="mode", greedy=False, **FAST)),
    ("topk-mode", lambda s: TopKConfig(sparsity=s, centre="mode", min_calibration_tokens=1)),
]


@pytest.mark.parametrize(("name", "make"), CENTRED, ids=[c[0] for c in CENTRED])
def test_zero_sparsity_is_the_dense_model_exactly(name, make, small_blocks):
    model = tiny_model("llama")
    dense = _logits(model)
    sparsify_(model, make(0.0), small_blocks)
    centred = _centred(model)
    assert centred and all(float(w.centre.abs().max()) > 0 for w in centred)
    torch.testing.assert_close(_logits(model), dense, **EXACT)


@pytest.mark.parametrize(("name", "make"), CENTRED, ids=[c[0] for c in CENTRED])
def test_centred_methods_reach_their_target_and_unsparsify_restores(
    name, make, calibration_blocks, held_blocks
):
    model = tiny_model("llama")
    dense = _logits(model)
    sparsify_(model, make(0.5), calibration_blocks)
    originals = [w.base_layer for w in _centred(model)]
    assert originals
    measured = measure(model, held_blocks)
    # top-k skips half the down projection's inputs: its activations, not the FFN's weights
    reached = measured.activation_sparsity if name.startswith("topk") else measured.total
    assert reached == pytest.approx(0.5, abs=0.08)
    assert not torch.allclose(_logits(model), dense)
    unsparsify(model)
    assert not list(sparse_modules(model))
    assert all(any(m is o for m in model.modules()) for o in originals)
    torch.testing.assert_close(_logits(model), dense, **EXACT)


def test_centring_changes_what_teal_drops(calibration_blocks):
    teal, scap = tiny_model("llama"), tiny_model("llama")
    sparsify_(teal, TEALConfig(sparsity=0.5, greedy=False, **FAST), calibration_blocks)
    sparsify_(scap, SCAPConfig(sparsity=0.5, greedy=False, **FAST), calibration_blocks)
    assert all(type(w) is ThresholdLinear for _, w in sparse_modules(teal))
    assert all(type(w) is CentredThresholdLinear for _, w in sparse_modules(scap))
    assert not torch.allclose(_logits(teal), _logits(scap))


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("llama", SCAPConfig(sparsity=0.5, greedy_tokens=32, **FAST)),
        ("gpt2", WINAConfig(sparsity=0.4, centre="median", attention=True, greedy=False, **FAST)),
        ("llama", TopKConfig(sparsity=0.5, centre="mean", min_calibration_tokens=1)),
    ],
    ids=["llama-scap", "gpt2-wina-median", "llama-topk-mean"],
)
def test_save_then_load_gives_the_same_outputs(name, config, small_blocks, tmp_path):
    model = tiny_model(name)
    sparsify_(model, config, small_blocks)
    expected = _logits(model, name)
    loaded = load_sparse(save_sparse(model, tmp_path / "centred"))
    torch.testing.assert_close(_logits(loaded, name), expected, **EXACT)
    for (_, saved), (_, again) in zip(sparse_modules(model), sparse_modules(loaded), strict=True):
        assert type(again) is type(saved)
        torch.testing.assert_close(again.centre, saved.centre, **EXACT)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: SCAPConfig(sparsity=s, greedy_tokens=64, **FAST),
        lambda s: TopKConfig(sparsity=s, centre="median", min_calibration_tokens=1),
    ],
    ids=["scap", "topk"],
)
def test_a_reused_calibration_sets_the_centres_on_a_fresh_model(make, small_blocks):
    first = tiny_model("llama")
    report = sparsify_(first, make(0.5), small_blocks)
    assert report.calibration is not None and report.calibration.buffers
    again = tiny_model("llama")
    sparsify_(again, make(0.5), None, calibration=report.calibration)
    torch.testing.assert_close(_logits(again), _logits(first), **EXACT)
    lower = tiny_model("llama")
    sparsify_(lower, make(0.25), None, calibration=report.calibration)
    for a, b in zip(_centred(lower), _centred(first), strict=True):
        torch.testing.assert_close(a.centre_bias, b.centre_bias, **EXACT)


@pytest.mark.parametrize("threshold", [0.0, 0.5], ids=["dense", "sparse"])
def test_a_frozen_wrapper_compiles_in_one_graph_and_equals_eager(threshold):
    torch.manual_seed(0)
    layer = CentredThresholdLinear(torch.nn.Linear(64, 32), layer=0, role="up_proj")
    layer.set_centre(torch.randn(64) * 0.3)
    layer.threshold.fill_(threshold)
    layer.freeze_for_compile()
    x = torch.randn(1, 1, 64)  # a decode step: the kernel path when sparse
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")  # a graph break fails
    with torch.no_grad(), use_backend("cpu"):
        expected = layer(x)
        eager_zeros = int(layer.zeros_seen)
        layer.reset_counters()
        got = compiled(x)
    torch.testing.assert_close(got, expected, **EXACT)
    assert int(layer.zeros_seen) == eager_zeros


# ---------------------------------------------------------------------------------------------
# configs and errors


def test_configs_round_trip_and_say_when_they_calibrate():
    assert not TopKConfig(sparsity=0.5).needs_calibration
    assert TopKConfig(sparsity=0.5, centre="mode").needs_calibration
    assert SCAPConfig().centre == "mode" and TEALConfig().centre == "none"
    for config in (SCAPConfig(sparsity=0.3, centre="median"), TopKConfig(centre="mean")):
        assert config_from_dict(config.to_dict()) == config
    # a top-k config saved before centring existed still reads, uncentred
    assert config_from_dict({"method": "topk", "sparsity": 0.5}) == TopKConfig(sparsity=0.5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SCAPConfig(centre="modal"),
        lambda: TopKConfig(centre=1),
        lambda: TEALConfig(centre=""),
    ],
)
def test_bad_centres_are_refused(make):
    with pytest.raises(MoefyError, match="centre must be one of none, mode, median, mean"):
        make()


def test_centred_top_k_without_calibration_text_is_a_one_line_error():
    model = tiny_model("llama")
    with pytest.raises(MoefyError, match="topk needs calibration text") as err:
        sparsify_(model, TopKConfig(sparsity=0.5, centre="mode"))
    assert "\n" not in str(err.value)
    assert not list(sparse_modules(model))


def test_cli_centre_option_and_its_errors(tmp_path, capsys):
    folder = save_tiny_hf_folder(tmp_path / "model", "llama")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"word{i % 13} film music team bank {i}" for i in range(400)))
    common = ["sparsify", "--model", str(folder), "--data", str(text), "--block-len", "32"]
    out = tmp_path / "topk"
    argv = [*common, "--method", "topk", "--centre", "mode", "--tokens", "64"]
    assert main([*argv, "--out", str(out)]) == 2  # 64 tokens: fewer than centring needs
    assert "fewer than the 1024 topk needs" in capsys.readouterr().err
    assert not out.exists()
    assert main([*common, "--method", "cats", "--centre", "mode", "--out", str(out)]) == 2
    assert "takes no --centre" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--method", "scap", "--centre", "modal"])
