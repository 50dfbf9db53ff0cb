"""SparsityProfile: save/load round trip, co-activation on disk, clear errors, the |h| histogram."""

from __future__ import annotations

import json

import pytest
import torch

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.profiling import ProfileConfig, SparsityProfile, profile, storage
from moefy.profiling import result as result_module
from moefy.profiling.accumulators import (
    ABS_HISTOGRAM_BINS,
    ABS_HISTOGRAM_SHIFT,
    abs_histogram_edges,
    fraction_below,
    histogram_quantile,
)
from tiny_models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("opt")


@pytest.fixture(scope="module")
def profiled(model) -> SparsityProfile:
    gen = torch.Generator().manual_seed(3)
    blocks = TokenBlocks(torch.randint(3, VOCAB, (4, 16), generator=gen), source="random")
    return profile(model, blocks, ProfileConfig(batch_size=2, coactivation=True))


def test_save_load_round_trip(profiled: SparsityProfile, tmp_path) -> None:
    out = profiled.save(tmp_path / "profile")
    assert sorted(p.name for p in out.iterdir()) == [
        "arrays.safetensors",
        "coactivation.safetensors",
        "moefy_output.json",
        "patterns.safetensors",
        "summary.json",
    ]
    loaded = SparsityProfile.load(out)
    assert loaded.config == profiled.config
    assert loaded.fingerprint == profiled.fingerprint
    assert (
        loaded.data
        == profiled.data
        == {
            "source": "random",
            "split": "",
            "n_tokens": 64,
            "block_len": 16,
        }
    )
    assert loaded.layers == profiled.layers
    assert loaded.table_rows() == profiled.table_rows()
    for i in range(profiled.num_layers):
        original = profiled.sums(i)
        assert loaded.sums(i).keys() == original.keys()
        for name, tensor in original.items():
            torch.testing.assert_close(loaded.sums(i)[name], tensor, atol=0, rtol=0)
        torch.testing.assert_close(loaded.coactivation(i), profiled.coactivation(i), atol=0, rtol=0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["version"] == result_module.PROFILE_VERSION
    assert "coactivation" not in json.dumps(summary["layers"])  # counts stay out of the summary
    assert (
        summary["layers"][0]["contribution_fraction"]["0.9"]
        == profiled.layers[0].contribution_fraction[0.9]
    )


def test_coactivation_is_ata_of_active_mask(profiled: SparsityProfile) -> None:
    for i in range(profiled.num_layers):
        counts = profiled.coactivation(i)
        assert counts.dtype == torch.float64
        torch.testing.assert_close(counts, counts.T, atol=0, rtol=0)
        # the diagonal of A^T A is each neuron's firing count
        torch.testing.assert_close(
            counts.diagonal(), profiled.sums(i)["firing_counts"], atol=0, rtol=0
        )
        assert bool((counts <= counts.diagonal()[:, None]).all())


def test_profile_without_coactivation(model, tmp_path) -> None:
    blocks = TokenBlocks(torch.randint(3, VOCAB, (2, 8)))
    result = profile(model, blocks, ProfileConfig(batch_size=2))
    result.save(tmp_path / "p")
    assert not (tmp_path / "p" / "coactivation.safetensors").exists()
    loaded = SparsityProfile.load(tmp_path / "p")
    assert not loaded.has_coactivation
    with pytest.raises(MoefyError, match="coactivation=True"):
        loaded.coactivation(0)
    with pytest.raises(MoefyError, match="out of range"):
        loaded.sums(5)


def test_load_errors(profiled: SparsityProfile, tmp_path) -> None:
    with pytest.raises(MoefyError, match="no sparsity profile"):
        SparsityProfile.load(tmp_path / "missing")
    out = profiled.save(tmp_path / "p")
    summary = json.loads((out / "summary.json").read_text())

    (out / "summary.json").write_text("{ not json")
    with pytest.raises(MoefyError, match="corrupt"):
        SparsityProfile.load(out)

    (out / "summary.json").write_text(json.dumps({**summary, "version": 99}))
    with pytest.raises(MoefyError, match="newer moefy"):
        SparsityProfile.load(out)

    (out / "summary.json").write_text(json.dumps(summary))
    (out / "arrays.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(MoefyError, match="arrays.safetensors"):
        SparsityProfile.load(out)

    out = profiled.save(tmp_path / "p", overwrite=True)
    (out / "coactivation.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(MoefyError, match="co-activation"):
        SparsityProfile.load(out).coactivation(0)

    (out / "coactivation.safetensors").unlink()
    with pytest.raises(MoefyError, match="missing"):
        SparsityProfile.load(out)

    (tmp_path / "file").write_text("x")
    with pytest.raises(MoefyError, match="not a folder"):
        profiled.save(tmp_path / "file")


def test_failed_save_keeps_the_old_profile(
    profiled: SparsityProfile, tmp_path, monkeypatch
) -> None:
    out = profiled.save(tmp_path / "p")
    before = (out / "summary.json").read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        profiled.save(out, overwrite=True)
    assert (out / "summary.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary left behind


def test_loaded_profile_resaves_coactivation(profiled: SparsityProfile, tmp_path) -> None:
    loaded = SparsityProfile.load(profiled.save(tmp_path / "a"))
    again = SparsityProfile.load(loaded.save(tmp_path / "b"))
    torch.testing.assert_close(again.coactivation(1), profiled.coactivation(1), atol=0, rtol=0)
    with pytest.raises(MoefyError, match="pass --overwrite"):
        loaded.save(tmp_path / "a")
    loaded.save(tmp_path / "a", overwrite=True)  # over the folder it reads its counts from
    torch.testing.assert_close(
        SparsityProfile.load(tmp_path / "a").coactivation(0),
        profiled.coactivation(0),
        atol=0,
        rtol=0,
    )


def test_check_model(profiled: SparsityProfile, model) -> None:
    profiled.check_model(model)
    with pytest.raises(MoefyError, match="different model"):
        profiled.check_model(tiny_model("gpt2"))


def test_table_rows(profiled: SparsityProfile) -> None:
    rows = profiled.table_rows()
    assert [row["layer"] for row in rows] == [0, 1]
    assert list(rows[0]) == [
        "layer",
        "zero %",
        "p50 neurons %",
        "p90 neurons %",
        "p99 neurons %",
        "active %",
        "chunk16 union %",
        "hot80 neurons %",
        "freq10 rate %",
    ]
    layer = profiled.layers[1]
    assert rows[1]["p90 neurons %"] == pytest.approx(100 * layer.contribution_fraction[0.9])
    assert rows[1]["zero %"] == pytest.approx(100 * layer.exact_zero_fraction)
    assert rows[1]["chunk16 union %"] == pytest.approx(100 * layer.chunk_union_fraction[16])


def test_histogram_edges_and_lookups() -> None:
    edges = abs_histogram_edges()
    assert edges.shape == (ABS_HISTOGRAM_BINS + 1,)
    assert edges[0] == 0.0
    j = (torch.tensor([1.0]).view(torch.int32).item()) >> ABS_HISTOGRAM_SHIFT
    assert edges[j] == 1.0 and edges[j + 1] == 1.0 + 2.0**-7  # 128 bins per binade
    values = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    histogram = torch.bincount(
        (values.view(torch.int32) >> ABS_HISTOGRAM_SHIFT), minlength=ABS_HISTOGRAM_BINS
    ).double()
    assert fraction_below(histogram, 1.0) == pytest.approx(3 / 8)  # 0, 0, 0.5
    assert fraction_below(histogram, 1.25) == pytest.approx(4 / 8)
    assert fraction_below(histogram, 10.0) == 1.0
    assert fraction_below(histogram, 0.0) == 0.0
    assert histogram_quantile(histogram, 0.5) == pytest.approx(1.0, rel=2**-7)
    assert histogram_quantile(histogram, 0.55) == pytest.approx(1.5, rel=2**-7)
    assert fraction_below(histogram, histogram_quantile(histogram, 0.55)) == pytest.approx(0.55)
    assert histogram_quantile(histogram, 1.0) == pytest.approx(4.0, rel=2**-7)


def test_quantile_and_fraction_below_of_a_profile(profiled: SparsityProfile) -> None:
    median = profiled.abs_quantile(0, 0.5)
    assert profiled.fraction_below(0, median) == pytest.approx(0.5, abs=0.02)
    with pytest.raises(MoefyError):
        profiled.abs_quantile(0, 1.5)
