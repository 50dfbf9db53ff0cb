"""The serving check's comparison and summary logic (pure Python; always runs)."""

from __future__ import annotations

import json

import pytest
from serving_scripts import load_compare

compare = load_compare()


def _record(*prompts):
    return {"prompts": [dict(prompt_ids=[1, 2], **p) for p in prompts]}


@pytest.mark.parametrize(
    "expected, actual, divergence",
    [
        ([1, 2, 3], [1, 2, 3], None),
        ([1, 2, 3], [9, 2, 3], 0),
        ([1, 2, 3], [1, 2, 4], 2),
        ([1, 2, 3], [1, 2], 2),
        ([1, 2], [1, 2, 3], 2),
        ([], [], None),
    ],
)
def test_first_divergence(expected, actual, divergence):
    assert compare.first_divergence(expected, actual) == divergence


def test_max_abs_difference_only_counts_compared_positions():
    assert compare.max_abs_difference([-1.0, -2.0, -3.0], [-1.25, -2.0, -30.0], 2) == 0.25
    assert compare.max_abs_difference([-1.0], [-2.0], 0) is None


def test_equal_generations_match_with_logprob_difference():
    ref = _record({"tokens": [5, 6, 7], "logprobs": [-0.1, -0.2, -0.3], "margins": [1, 1, 1]})
    eng = _record({"tokens": [5, 6, 7], "logprobs": [-0.1, -0.2, -0.35]})
    result = compare.compare_generations(ref, eng)
    assert result["greedy_match"] and result["prompts_matching"] == 1
    assert result["max_abs_logprob_diff"] == pytest.approx(0.05)
    assert result["per_prompt"][0]["compared_positions"] == 3


def test_divergence_is_located_and_near_ties_labelled():
    ref = _record(
        {"tokens": [5, 6, 7], "logprobs": [-0.1, -0.2, -0.3], "margins": [1.0, 1e-4, 1.0]},
        {"tokens": [5, 6, 7], "logprobs": [-0.1, -0.2, -0.3], "margins": [1.0, 1.0, 0.5]},
    )
    eng = _record(
        {"tokens": [5, 9, 9], "logprobs": [-0.1, -0.7, -9.0]},
        {"tokens": [5, 6, 8], "logprobs": [-0.3, -0.2, -9.0]},
    )
    result = compare.compare_generations(ref, eng)
    tie, real = result["per_prompt"]
    assert not result["greedy_match"] and result["prompts_matching"] == 0
    assert (tie["first_divergence"], tie["near_tie"], tie["compared_positions"]) == (1, True, 1)
    assert (real["first_divergence"], real["near_tie"], real["reference_margin"]) == (2, False, 0.5)
    # the diverged tail (-9.0) is never compared; the second prompt's first token is
    assert result["max_abs_logprob_diff"] == pytest.approx(0.2)


def test_other_prompt_ids_or_counts_are_refused():
    ref = _record({"tokens": [5], "logprobs": [-0.1]})
    other = {"prompts": [{"prompt_ids": [7], "tokens": [5], "logprobs": [-0.1]}]}
    with pytest.raises(compare.CheckError, match="prompt ids"):
        compare.compare_generations(ref, other)
    with pytest.raises(compare.CheckError, match="1 prompts, the engine 0"):
        compare.compare_generations(ref, {"prompts": []})


def test_summary_passes_only_when_every_model_matches():
    ref = _record({"tokens": [5], "logprobs": [-0.1], "margins": [1.0]})
    same = compare.compare_generations(ref, _record({"tokens": [5], "logprobs": [-0.1]}))
    other = compare.compare_generations(ref, _record({"tokens": [4], "logprobs": [-0.1]}))
    speeds = {"model": {"sequential": 30.0, "batched": 90.0}, "dense": {"sequential": 20.0}}
    good = compare.summarise("vllm", {"model": same, "dense": same}, speeds, {"k": 1})
    assert good["passed"] and good["speed_ratio"] == {"sequential": 1.5}
    assert not compare.summarise("vllm", {"model": same, "dense": other}, speeds, {})["passed"]
    assert not compare.summarise("vllm", {}, speeds, {})["passed"]
    text = compare.format_summary(compare.summarise("vllm", {"dense": other}, speeds, {}))
    assert "dense: greedy 0/1 prompts equal" in text and "first differs at token 0" in text
    assert "ratio 1.50" in text


@pytest.mark.parametrize(
    "model, dense, ratio", [(2.0, 4.0, 0.5), (2.0, 0.0, None), (None, 1.0, None)]
)
def test_speed_ratio(model, dense, ratio):
    assert compare.speed_ratio(model, dense) == ratio


def test_records_round_trip_and_malformed_ones_are_refused(tmp_path):
    record = _record({"tokens": [5], "logprobs": [-0.1]})
    path = tmp_path / "sub" / "record.json"
    compare.write_json(path, record)
    assert compare.read_record(path) == record
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]
    (tmp_path / "bad.json").write_text(json.dumps({"prompts": [{"tokens": []}]}))
    with pytest.raises(compare.CheckError, match="not a generation record"):
        compare.read_record(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(compare.CheckError, match="cannot read"):
        compare.read_record(tmp_path / "broken.json")


def test_teacher_forced_agreement_counts_every_position_past_a_divergence():
    ref = _record(
        {"tokens": [5, 6, 7], "logprobs": [-0.1, -0.2, -0.3], "margins": [1, 1, 1]},
        {"tokens": [5, 6], "logprobs": [-0.1, -0.2], "margins": [1, 1]},
    )
    eng = _record(
        # greedy diverged at token 0, yet fed transformers' tokens it agrees at 2 of 3
        {
            "tokens": [4, 4, 4],
            "logprobs": [-0.5, -1, -1],
            "forced": {"tokens": [4, 6, 7], "logprobs": [-0.5, -0.2, -0.31]},
        },
        {
            "tokens": [5, 6],
            "logprobs": [-0.1, -0.2],
            "forced": {"tokens": [5, 6], "logprobs": [-0.1, -0.2]},
        },
    )
    result = compare.compare_generations(ref, eng)
    assert result["prompts_matching"] == 1
    forced = result["teacher_forced"]
    assert (forced["agreeing"], forced["positions"]) == (4, 5)
    assert forced["agreement"] == pytest.approx(0.8)
    assert forced["max_abs_logprob_diff"] == pytest.approx(0.4)
    assert result["per_prompt"][0]["teacher_forced"]["agreeing"] == 2
    text = compare.format_summary(compare.summarise("llamacpp", {"model": result}, {}, {}))
    assert "teacher-forced: 4/5 positions choose transformers' token" in text


def test_teacher_forced_pass_is_optional_but_must_cover_the_reference():
    ref = _record({"tokens": [5, 6], "logprobs": [-0.1, -0.2]})
    assert (
        compare.compare_generations(ref, _record({"tokens": [5, 6], "logprobs": [-0.1, -0.2]}))[
            "teacher_forced"
        ]
        is None
    )
    short = _record(
        {"tokens": [5, 6], "logprobs": [-0.1, -0.2], "forced": {"tokens": [5], "logprobs": [0.0]}}
    )
    with pytest.raises(compare.CheckError, match="teacher-forced pass"):
        compare.compare_generations(ref, short)
