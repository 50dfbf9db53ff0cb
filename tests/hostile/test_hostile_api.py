"""Hostile inputs to moefy's Python API.

Every row of :data:`API_CASES` runs through :func:`test_refused`: the call raises
:class:`moefy.MoefyError` (not a raw TypeError, KeyError or RecursionError) with a one-line
message, and nothing on disk changed: the scratch folder, the session's assets and the system
paths the suite watches hash the same before and after.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile_cases import LONG_NAME, PROOF, Setup, copy_asset, symlink, user_file, user_folder
from hostile_support import (
    Assets,
    CaseTimedOut,
    DiskState,
    GuardTripped,
    system_guard,
    watchdog,
)

import moefy
from moefy.errors import MoefyError
from tiny_models import tiny_model, tiny_tokenizer

SYSTEM_PATHS = ("/dev/null", "/dev/full")


class Api:
    """What a row calls with: the scratch folder, the assets, and fresh tiny models (built on
    first use, in memory, so a row may change them in place)."""

    def __init__(self, scratch: Path, assets: Assets) -> None:
        self.scratch = scratch
        self.assets = assets

    def path(self, name: str) -> str:
        return str(self.scratch / name)

    @functools.cached_property
    def model(self) -> torch.nn.Module:
        return tiny_model("llama")

    @functools.cached_property
    def moefied(self) -> torch.nn.Module:
        model = tiny_model("llama")
        moefy.moefy_(model, moefy.MoEfyConfig(num_experts=4))
        return model

    @functools.cached_property
    def sparse(self) -> torch.nn.Module:
        from moefy.sparsify import config_from_dict

        model = tiny_model("llama")
        moefy.sparsify_(model, config_from_dict({"method": "topk", "sparsity": 0.5}))
        return model

    @functools.cached_property
    def dropped(self) -> torch.nn.Module:
        model = tiny_model("llama")
        moefy.drop_layers_(model, blocks=[1])
        return model

    @functools.cached_property
    def blocks(self) -> Any:
        text = moefy.load_text(str(self.assets["text"]))
        return text.blocks(tiny_tokenizer(), "evaluation", block_len=32, n_tokens=128)

    def eval_config(self, **fields: Any) -> Any:
        settings = dict(data=str(self.assets["text"]), tokens=256, block_len=32, batch_size=4)
        return moefy.EvalConfig(**{**settings, **fields})


@dataclass(frozen=True)
class ApiCase:
    """One hostile call: ``call(api)`` must raise MoefyError and change nothing on disk."""

    id: str
    call: Callable[[Api], object]
    setup: tuple[Setup, ...] = ()


def _long_text() -> Setup:
    return user_file("texts/doc.txt", "the market and the bank " * 2000)


API_CASES = (
    # loading models and text
    ApiCase("load-model-none", lambda a: moefy.load_model(None)),
    ApiCase("load-model-empty", lambda a: moefy.load_model("")),
    ApiCase("load-model-int", lambda a: moefy.load_model(123)),
    ApiCase("load-model-dtype-int8", lambda a: moefy.load_model(a.assets["tiny"], dtype="int8")),
    ApiCase(
        "load-model-torch-int8", lambda a: moefy.load_model(a.assets["tiny"], dtype=torch.int8)
    ),
    ApiCase("load-model-device-tpu", lambda a: moefy.load_model(a.assets["tiny"], device="tpu")),
    ApiCase(
        "load-model-device-cuda-99", lambda a: moefy.load_model(a.assets["tiny"], device="cuda:99")
    ),
    ApiCase("load-model-hub-id", lambda a: moefy.load_model("someorg/some-model")),
    ApiCase(
        "load-model-user-folder",
        lambda a: moefy.load_model(a.path("mywork")),
        (user_folder("mywork"),),
    ),
    ApiCase("load-user-folder", lambda a: moefy.load(a.path("mywork")), (user_folder("mywork"),)),
    ApiCase("load-hub-id", lambda a: moefy.load("someorg/some-model")),
    ApiCase("load-text-none", lambda a: moefy.load_text(None)),
    ApiCase("load-text-empty", lambda a: moefy.load_text(""), (_long_text(),)),
    ApiCase("load-text-int", lambda a: moefy.load_text(5)),
    ApiCase(
        "load-text-empty-folder",
        lambda a: moefy.load_text(a.path("empty")),
        (lambda scratch, assets: (scratch / "empty").mkdir(),),
    ),
    ApiCase(
        "blocks-no-tokenizer",
        lambda a: moefy.load_text(str(a.assets["text"])).blocks(None, n_tokens=64),
    ),
    ApiCase(
        "blocks-zero-tokens",
        lambda a: moefy.load_text(str(a.assets["text"])).blocks(tiny_tokenizer(), n_tokens=0),
    ),
    # evaluation
    ApiCase("perplexity-empty-list", lambda a: moefy.perplexity(a.model, [])),
    ApiCase("perplexity-none", lambda a: moefy.perplexity(a.model, None)),
    ApiCase("perplexity-text", lambda a: moefy.perplexity(a.model, "the market")),
    ApiCase("perplexity-batch-0", lambda a: moefy.perplexity(a.model, a.blocks, batch_size=0)),
    ApiCase(
        "perplexity-batch-minus-1", lambda a: moefy.perplexity(a.model, a.blocks, batch_size=-1)
    ),
    ApiCase("perplexity-nan-weights", lambda a: moefy.perplexity(_poisoned(a.model), a.blocks)),
    ApiCase("eval-config-unknown-task", lambda a: a.eval_config(tasks=("mind-reading",))),
    ApiCase("eval-config-tokens-0", lambda a: a.eval_config(tokens=0)),
    ApiCase("eval-config-tasks-string", lambda a: a.eval_config(tasks="perplexity")),
    ApiCase("evaluate-not-a-config", lambda a: moefy.evaluate(a.model, {"tasks": ["x"]})),
    # MoEfication
    ApiCase("moefy-experts-0", lambda a: moefy.moefy_(a.model, moefy.MoEfyConfig(num_experts=0))),
    ApiCase("moefy-experts-negative", lambda a: moefy.MoEfyConfig(num_experts=-1)),
    ApiCase("moefy-experts-nan", lambda a: moefy.MoEfyConfig(num_experts=float("nan"))),
    ApiCase("moefy-experts-string", lambda a: moefy.MoEfyConfig(num_experts="4")),
    ApiCase("moefy-experts-and-size", lambda a: moefy.MoEfyConfig(num_experts=4, expert_size=16)),
    ApiCase("moefy-method-unknown", lambda a: moefy.MoEfyConfig(num_experts=4, method="kmeans")),
    ApiCase("moefy-size-multiple-0", lambda a: moefy.MoEfyConfig(num_experts=4, size_multiple=0)),
    ApiCase(
        "moefy-more-experts-than-neurons",
        lambda a: moefy.moefy_(a.model, moefy.MoEfyConfig(num_experts=1000)),
    ),
    ApiCase("moefy-config-none", lambda a: moefy.moefy_(a.model, None)),
    ApiCase("moefy-config-dict", lambda a: moefy.moefy_(a.model, {"num_experts": 4})),
    ApiCase("moefy-twice", lambda a: moefy.moefy_(a.moefied, moefy.MoEfyConfig(num_experts=4))),
    ApiCase(
        "moefy-coactivation-no-profile",
        lambda a: moefy.moefy_(a.model, moefy.MoEfyConfig(num_experts=4, method="coactivation")),
    ),
    ApiCase(
        "moefy-not-a-transformer",
        lambda a: moefy.moefy_(torch.nn.Linear(4, 4), moefy.MoEfyConfig(num_experts=4)),
    ),
    ApiCase("set-selection-dense", lambda a: moefy.set_selection(a.model, fraction=0.5)),
    ApiCase("set-selection-fraction-1p5", lambda a: moefy.set_selection(a.moefied, fraction=1.5)),
    ApiCase("set-selection-k-99", lambda a: moefy.set_selection(a.moefied, k=99)),
    ApiCase("set-selection-keep-1p5", lambda a: moefy.set_selection(a.moefied, keep=1.5)),
    ApiCase("set-selection-keep-nan", lambda a: moefy.set_selection(a.moefied, keep=float("nan"))),
    ApiCase(
        "set-selection-keep-and-fraction",
        lambda a: moefy.set_selection(a.moefied, keep=0.5, fraction=0.5),
    ),
    ApiCase("unmoefy-dense", lambda a: moefy.unmoefy(a.model)),
    # saving: the output policy
    ApiCase(
        "save-user-folder",
        lambda a: moefy.save(a.moefied, a.path("mywork")),
        (user_folder("mywork"),),
    ),
    ApiCase(
        "save-user-folder-overwrite",
        lambda a: moefy.save(a.moefied, a.path("mywork"), overwrite=True),
        (user_folder("mywork"),),
    ),
    ApiCase("save-empty-path", lambda a: moefy.save(a.moefied, "")),
    ApiCase(
        "save-existing-file",
        lambda a: moefy.save(a.moefied, a.path("notes.txt")),
        (user_file("notes.txt"),),
    ),
    ApiCase(
        "save-earlier-output",
        lambda a: moefy.save(a.moefied, a.path("earlier")),
        (copy_asset("moe", "earlier"),),
    ),
    ApiCase("save-dense-model", lambda a: moefy.save(a.model, a.path("new"))),
    ApiCase("save-dev-null", lambda a: moefy.save(a.moefied, "/dev/null")),
    ApiCase("save-root", lambda a: moefy.save(a.moefied, "/")),
    ApiCase(
        "save-link-to-folder",
        lambda a: moefy.save(a.moefied, a.path("dirlink")),
        (user_folder("realdir"), symlink("dirlink", "realdir")),
    ),
    ApiCase(
        "save-parent-is-file",
        lambda a: moefy.save(a.moefied, a.path("notes.txt/x")),
        (user_file("notes.txt"),),
    ),
    ApiCase("save-long-name", lambda a: moefy.save(a.moefied, a.path(LONG_NAME))),
    ApiCase(
        "save-dotdot", lambda a: moefy.save(a.moefied, a.path("sub/..")), (user_folder("sub"),)
    ),
    ApiCase(
        "save-sparse-user-folder",
        lambda a: moefy.save_sparse(a.sparse, a.path("mywork")),
        (user_folder("mywork"),),
    ),
    ApiCase("save-sparse-dev-full", lambda a: moefy.save_sparse(a.sparse, "/dev/full")),
    ApiCase(
        "save-dropped-user-folder",
        lambda a: moefy.save_dropped(a.dropped, a.path("mywork")),
        (user_folder("mywork"),),
    ),
    ApiCase(
        "save-dropped-existing-file",
        lambda a: moefy.save_dropped(a.dropped, a.path("notes.txt")),
        (user_file("notes.txt"),),
    ),
    ApiCase(
        "from-pretrained-user-folder",
        lambda a: moefy.from_pretrained(a.path("mywork")),
        (user_folder("mywork"),),
    ),
    ApiCase("from-pretrained-missing", lambda a: moefy.from_pretrained(a.path("gone"))),
    ApiCase("from-pretrained-dense-folder", lambda a: moefy.from_pretrained(a.assets["tiny"])),
    ApiCase("load-sparse-dense-folder", lambda a: moefy.load_sparse(a.assets["tiny"])),
    ApiCase("load-dropped-dense-folder", lambda a: moefy.load_dropped(a.assets["tiny"])),
    ApiCase("load-sparse-moefied-folder", lambda a: moefy.load_sparse(a.assets["moe"])),
    # profiles
    ApiCase("profile-empty-list", lambda a: moefy.profile(a.model, [])),
    ApiCase("profile-active-share-1p5", lambda a: moefy.ProfileConfig(active_share=1.5)),
    ApiCase("profile-load-missing", lambda a: moefy.SparsityProfile.load(a.path("gone"))),
    ApiCase(
        "profile-load-user-folder",
        lambda a: moefy.SparsityProfile.load(a.path("mywork")),
        (user_folder("mywork"),),
    ),
    # training-free sparsity
    ApiCase("sparsify-teal-1p5", lambda a: moefy.TEALConfig(sparsity=1.5)),
    ApiCase("teal-sink-positions-negative", lambda a: moefy.TEALConfig(greedy_sink_positions=-1)),
    ApiCase("teal-sink-positions-float", lambda a: moefy.TEALConfig(greedy_sink_positions=1.5)),
    ApiCase("sparsify-topk-nan", lambda a: moefy.TopKConfig(sparsity=float("nan"))),
    ApiCase("sparsify-config-none", lambda a: moefy.sparsify_(a.model, None)),
    ApiCase("sparsify-config-string", lambda a: moefy.sparsify_(a.model, "teal")),
    ApiCase(
        "sparsify-teal-no-data", lambda a: moefy.sparsify_(a.model, moefy.TEALConfig(sparsity=0.5))
    ),
    # routers
    ApiCase("router-config-unknown", lambda a: moefy.RouterConfig(router="oracle")),
    ApiCase("router-config-epochs-0", lambda a: moefy.RouterConfig(epochs=0)),
    ApiCase("train-routers-dense", lambda a: moefy.train_routers(a.model, a.blocks)),
    ApiCase("set-routing-dense", lambda a: moefy.set_routing(a.model, "topk", fraction=0.5)),
    ApiCase("set-routing-unknown-rule", lambda a: moefy.set_routing(a.moefied, "psychic")),
    ApiCase("set-routing-keep-2", lambda a: moefy.set_routing(a.moefied, "topk", keep=2)),
    ApiCase(
        "set-routing-keep-and-fraction",
        lambda a: moefy.set_routing(a.moefied, "topk", keep=0.5, fraction=0.5),
    ),
    # layers
    ApiCase("drop-attention-99", lambda a: moefy.drop_layers_(a.model, attention=[99])),
    ApiCase("drop-config-negative", lambda a: moefy.DropConfig(attention=(-1,))),
    ApiCase("layer-importance-batch-0", lambda a: moefy.LayerImportanceConfig(batch_size=0)),
    # sweeps and training
    ApiCase("sweep-config-unknown-method", lambda a: moefy.SweepConfig(methods=("psychic",))),
    ApiCase("sweep-config-level-2", lambda a: moefy.SweepConfig(levels=(2.0,))),
    ApiCase(
        "sweep-into-user-folder",
        lambda a: _sweep(
            moefy.SweepConfig(
                model=str(a.assets["tiny"]), methods=("dense",), eval=a.eval_config()
            ),
            a.path("mywork"),
        ),
        (user_folder("mywork"),),
    ),
    ApiCase("finetune-config-lr-negative", lambda a: moefy.FinetuneConfig(max_steps=1, lr=-1.0)),
    ApiCase("finetune-config-lr-nan", lambda a: moefy.FinetuneConfig(max_steps=1, lr=float("nan"))),
    ApiCase(
        "finetune-into-user-folder",
        lambda a: _finetune(
            a.model, a.blocks, moefy.FinetuneConfig(max_steps=1), out=a.path("mywork")
        ),
        (user_folder("mywork"),),
    ),
    ApiCase("relufy-negative-threshold", lambda a: moefy.relufy_(a.model, threshold=-1.0)),
    ApiCase("lowrank-negative-rank", lambda a: _sparsify_config("lowrank", rank=-1)),
    ApiCase(
        "lowrank-rank-over-matrix",
        lambda a: moefy.sparsify_(a.model, _sparsify_config("lowrank", rank=10_000), a.blocks),
    ),
    ApiCase("budget-unknown-rule", lambda a: _sparsify_config("teal", budget="everywhere")),
    ApiCase("centre-unknown", lambda a: _sparsify_config("wina", centre="middle")),
    ApiCase(
        "centre-topk-without-text",
        lambda a: moefy.sparsify_(a.model, _sparsify_config("topk", centre="mode")),
    ),
    ApiCase(
        "rotate-sparsified-twice",
        lambda a: moefy.sparsify_(a.sparse, _sparsify_config("rotate"), a.blocks),
    ),
    ApiCase("export-not-moefied", lambda a: moefy.export(a.model, a.path("out"))),
    ApiCase("export-unknown-format", lambda a: moefy.export(a.moefied, a.path("o"), format="onnx")),
    ApiCase(
        "export-into-user-folder",
        lambda a: moefy.export(a.moefied, a.path("mywork")),
        (user_folder("mywork"),),
    ),
)


def _sparsify_config(method: str, **fields: Any) -> Any:
    from moefy.sparsify import config_from_dict

    return config_from_dict({"method": method, "min_calibration_tokens": 1, **fields})


def _sweep(*args: Any, **kwargs: Any) -> Any:
    # ``moefy.sweep`` is the subpackage once it has been imported, not the verb
    from moefy.sweep import sweep

    return sweep(*args, **kwargs)


def _finetune(*args: Any, **kwargs: Any) -> Any:
    from moefy.finetune import finetune  # likewise

    return finetune(*args, **kwargs)


def _poisoned(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with a NaN in every weight: perplexity must say so rather than return nan."""
    with torch.no_grad():
        for param in model.parameters():
            param.view(-1)[0] = float("nan")
    return model


@pytest.mark.parametrize("case", API_CASES, ids=[f"api-{case.id}" for case in API_CASES])
def test_refused(case: ApiCase, scratch: Path, assets: Assets):
    for setup in case.setup:
        setup(scratch, assets)
    api = Api(scratch, assets)
    _ = assets["text"], assets["tiny"]  # built before the snapshot, read by many rows
    disk = DiskState([scratch, *assets.built()], SYSTEM_PATHS)
    before = disk.take()

    problems = []
    with watchdog(), system_guard():
        try:
            case.call(api)
            problems.append("returned without an error")
        except MoefyError as err:
            message = str(err).strip()
            if not message or "\n" in message:
                problems.append(f"the message is not one line: {message[:300]!r}")
        except (GuardTripped, CaseTimedOut) as err:
            problems.append(f"{type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 - a raw Python error instead of MoefyError
            lines = str(err).strip().splitlines()
            problems.append(f"raised {type(err).__name__}: {lines[-1][:200] if lines else ''}")
    if (scratch / PROOF).exists():
        problems.append("a crafted pickle ran its code")
    changes = DiskState.changes(before, disk.take())
    if changes:
        problems.append(f"disk changed ({len(changes)}): " + "; ".join(changes[:6]))
    assert not problems, " | ".join(problems)


def test_the_table_is_unique():
    ids = [case.id for case in API_CASES]
    assert len(ids) == len(set(ids))
