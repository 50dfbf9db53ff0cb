"""The MoE change of moefy's saved format: moefied (and routed) models saved and loaded back.

A moefied model saves, beside the Hugging Face config and the whole state dict (MoE weights,
slot permutations and selector or router state included; tied weights stored once),
``moefy_config.json``: the format version, the :class:`MoEfyConfig`, the model class and dtype,
and per MoE layer its place, E, S, shared experts (``num_shared``, 0 when absent) and selector
settings. Loading swaps empty MoE layers of the recorded shapes into the base model built on the
meta device, after comparing every recorded size with the safetensors header, and the state
dict is then loaded strictly.
:func:`save` and :func:`from_pretrained` are :func:`moefy.save` and :func:`moefy.load` for
models that must be moefied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moefy.arch import FFNSite, find_ffns, replace_ffn
from moefy.errors import MoefyError
from moefy.jsonconfig import read_json
from moefy.models.hf_config import HF_CONFIG_FILE
from moefy.models.weights import float_dtype
from moefy.moe.config import MoEfyConfig
from moefy.moe.convert import moe_layers
from moefy.moe.module import MoEFFN, check_slots
from moefy.moe.selectors import selector_from_dict
from moefy.saving.changes import ChangeFormat, Header, register_format, same_place

FORMAT_NAME = "moefy-moe"
FORMAT_VERSION = 1
MOEFY_CONFIG_FILE = "moefy_config.json"
WEIGHTS_FILE = "model.safetensors"
# layer record fields: integers (the smallest allowed value) and booleans
_LAYER_INTS = {"index": 0, "num_experts": 1, "expert_size": 1, "d_ff": 1}
_LAYER_BOOLS = ("gated", "in_bias", "out_bias")
# safetensors dtype codes a saved MoE layer may hold: float weights and int64 slot tables
_FLOAT_CODES = ("F16", "BF16", "F32", "F64")
_SLOT_CODE = "I64"


def save(
    model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """Write a moefied model (and any other change moefy made to it) to the folder ``path``.

    Args:
        model: a moefied Hugging Face model.
        path: the output folder.
        tokenizer: optional tokenizer to save alongside.
        overwrite: replace ``path`` if moefy wrote it before (see :mod:`moefy.io`; a folder
            moefy did not write is never replaced).

    Returns:
        The folder path.

    Raises:
        MoefyError: the model has no MoE layers or no Hugging Face config, or ``path`` is
            refused (it exists without ``overwrite``, or moefy did not write it).

    Example:
        >>> save(model, "runs/moe", tokenizer=tokenizer)
        >>> same = from_pretrained("runs/moe")
    """
    from moefy.saving.folder import save as save_changed

    if not moe_layers(model):
        raise MoefyError("the model has no MoE layers; save a dense model with save_pretrained")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise MoefyError("save needs a Hugging Face model (one with a .config)")
    return save_changed(model, path, tokenizer=tokenizer, overwrite=overwrite)


def _capture(model: nn.Module) -> dict[str, Any] | None:
    """The record of a moefied model's MoE layers, or None for a model without any."""
    layers = moe_layers(model)
    if not layers:
        return None
    unplaced = [moe for moe in layers if not moe.site_name or moe.layer_index < 0]
    if unplaced:
        raise MoefyError("save needs MoE layers made by moefy_ or from_pretrained (with a place)")
    moefy_config = layers[0].moefy_config
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "dtype": str(layers[0].w_in.dtype).removeprefix("torch."),
        "moefy_config": None if moefy_config is None else moefy_config.to_dict(),
        "layers": [moe.layer_record() for moe in layers],
    }


def _read_record(folder: Path) -> dict[str, Any]:
    for name in (HF_CONFIG_FILE, WEIGHTS_FILE, MOEFY_CONFIG_FILE):
        if not (folder / name).is_file():
            raise MoefyError(f"{folder}: missing {name}; not a folder written by moefy.save")
    record = read_json(folder / MOEFY_CONFIG_FILE, f"{folder / MOEFY_CONFIG_FILE}: corrupt JSON")
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise MoefyError(f"{folder / MOEFY_CONFIG_FILE}: not a moefy MoE config")
    version = record.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
        raise MoefyError(
            f"{folder / MOEFY_CONFIG_FILE}: format version {record.get('version')!r} is not "
            f"supported (this moefy reads version {FORMAT_VERSION})"
        )
    for key in ("model_class", "dtype", "layers"):
        if key not in record:
            raise MoefyError(f"{folder / MOEFY_CONFIG_FILE}: missing {key!r}")
    if not isinstance(record["model_class"], str):
        raise MoefyError(
            f"{folder / MOEFY_CONFIG_FILE}: model_class {record['model_class']!r} is not a class "
            "name: save the model again"
        )
    float_dtype(record["dtype"], folder / MOEFY_CONFIG_FILE)
    _check_layer_records(record["layers"], folder / MOEFY_CONFIG_FILE)
    return record


def _layer_problem(entry: Any) -> str | None:
    """What is wrong with the fields of one layer record, or None."""
    if not isinstance(entry, dict):
        return f"is {type(entry).__name__}, not an object"
    for key, lowest in _LAYER_INTS.items():
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            return f"has {key}={value!r}, not an integer >= {lowest}"
    for key in _LAYER_BOOLS:
        if not isinstance(entry.get(key), bool):
            return f"has {key}={entry.get(key)!r}, not true or false"
    if not isinstance(entry.get("name"), str) or not isinstance(entry.get("selector"), dict):
        return "lacks its name or selector"
    shared = entry.get("num_shared", 0)
    if (
        isinstance(shared, bool)
        or not isinstance(shared, int)
        or not 0 <= shared < entry["num_experts"]
    ):
        return f"has num_shared={shared!r}, not an integer in [0, {entry['num_experts']})"
    if entry["d_ff"] > entry["num_experts"] * entry["expert_size"]:
        return (
            f"has {entry['num_experts']} experts x {entry['expert_size']} slots, fewer than its "
            f"d_ff={entry['d_ff']} neurons"
        )
    return None


def _check_layer_records(layers: Any, where: Path) -> None:
    """Refuse layer records of the wrong types or ranges, before anything is built from them."""
    if not isinstance(layers, list) or not layers:
        raise MoefyError(f"{where}: 'layers' is not a non-empty list: save the model again")
    problems = []
    for position, entry in enumerate(layers):
        problem = _layer_problem(entry)
        if problem is not None:
            label = entry.get("index", position) if isinstance(entry, dict) else position
            problems.append((label, problem))
    _raise_first(where, problems, len(layers), "save the model again")
    indices = [entry["index"] for entry in layers]
    if len(set(indices)) != len(indices):
        raise MoefyError(f"{where}: a layer index appears twice: save the model again")


def _raise_first(where: Path, problems: list[tuple[Any, str]], total: int, todo: str) -> None:
    """One line for all the layers that are wrong: the first one, and how many there are."""
    if not problems:
        return
    label, problem = problems[0]
    more = f" ({len(problems)} of {total} layers are wrong)" if len(problems) > 1 else ""
    raise MoefyError(f"{where}: layer {label} {problem}{more}: {todo}")


def _empty_moe(site_weights: Any, entry: dict[str, Any], device: Any = None) -> MoEFFN:
    """An MoE layer of the recorded shapes (checked by :func:`_check_layer_records`), zeroed;
    on ``device="meta"`` (under ``torch.device("meta")``) it allocates nothing."""
    E, S, D = entry["num_experts"], entry["expert_size"], site_weights.d_model
    selector = selector_from_dict(entry["selector"], num_experts=E, d_model=D)
    return MoEFFN(
        D,
        E,
        S,
        gated=entry["gated"],
        act=site_weights.act,
        in_bias=entry["in_bias"],
        out_bias=entry["out_bias"],
        selector=selector,
        num_shared=entry.get("num_shared", 0),
        dtype=site_weights.w_up.dtype,
        device=site_weights.w_up.device if device is None else device,
    )


def _moe_prefix(site: Any, header: Header) -> str:
    """Where the MoE layer of ``site`` sits in the saved state dict: in the block, for inline
    FFNs; deeper where a change made after moefying wraps it (a dropped MLP or block keeps it
    under ``base_layer``), found as the one saved ``perm`` whose path holds the site's path."""
    prefix = f"{site.name}.{site.spec.up}" if site.spec.inline else site.name
    if f"{prefix}.perm" in header:
        return prefix
    nested = [
        key.removesuffix(".perm")
        for key in header
        if key.endswith(".perm") and same_place(f"{prefix}.perm", key)
    ]
    return nested[0] if len(nested) == 1 else prefix


def _layer_vs_weights(entry: dict[str, Any], site: Any, header: Header, name: str) -> str | None:
    """What is wrong with a layer record against its model site and the weights' header, or
    None; the comparison builds the layer on the meta device, so no record allocates memory."""
    weights = site.weights()
    if entry["d_ff"] != weights.d_ff or entry["gated"] != weights.gated:
        return (
            f"records d_ff={entry['d_ff']}, gated={entry['gated']} but the model config gives "
            f"d_ff={weights.d_ff}, gated={weights.gated}"
        )
    prefix = _moe_prefix(site, header)
    slots = header.get(f"{prefix}.perm")
    if slots is None:
        return f"has no weights in {name} (no {prefix}.perm)"
    if slots[0] != (entry["num_experts"], entry["expert_size"]):
        held = " x ".join(str(n) for n in slots[0])
        return (
            f"records {entry['num_experts']} experts x {entry['expert_size']} slots but {name} "
            f"holds {held}"
        )
    try:
        with torch.device("meta"):
            skeleton = _empty_moe(weights, entry, device="meta")
    except (ValueError, TypeError, KeyError) as err:  # MoefyError included: a bad selector
        return f"has a selector that cannot be built ({err})"
    expected = skeleton.state_dict()
    for key, tensor in expected.items():
        saved = header.get(f"{prefix}.{key}")
        codes = (_SLOT_CODE,) if key == "perm" else _FLOAT_CODES
        if saved is None:
            return f"needs {prefix}.{key}, which {name} lacks"
        if saved[0] != tuple(tensor.shape) or saved[1] not in codes:
            return (
                f"needs {prefix}.{key} of shape {tuple(tensor.shape)}; {name} holds "
                f"{saved[1]} {saved[0]}"
            )
    extra = sorted(
        k for k in header if k.startswith(f"{prefix}.") and k[len(prefix) + 1 :] not in expected
    )
    if extra:
        return f"does not give the layer {extra[0]}, which {name} holds"
    return None


def from_pretrained(path: str | os.PathLike) -> nn.Module:
    """Load a folder written by :func:`save` (or :func:`moefy.save` of a moefied model): same
    structure, same weights, same outputs.

    Args:
        path: the folder.

    Returns:
        The moefied model (with any other change it was saved with), in eval mode.

    Raises:
        MoefyError: missing or corrupt files, an unsupported format version, or weights whose
            names or shapes do not match the recorded structure.

    Example:
        >>> model = from_pretrained("runs/moe")
        >>> set_selection(model, keep=0.25)
    """
    from moefy.saving.folder import load_folder

    folder = Path(path)
    if not folder.is_dir():
        raise MoefyError(f"{folder}: no such folder")
    return load_folder(folder, require=FORMAT_NAME)


def _placed_sites(
    model: nn.Module, record: dict[str, Any], where: Path
) -> list[tuple[dict[str, Any], FFNSite]]:
    """Each layer record with the model's FFN site it names; one line for one that fits none."""
    sites = find_ffns(model)
    placed = []
    for entry in record["layers"]:
        index = entry["index"]
        if index >= len(sites):
            raise MoefyError(
                f"{where}: layer index {index} is not in this model ({len(sites)} FFNs)"
            )
        site = sites[index]
        if entry["name"] != site.name:
            raise MoefyError(
                f"{where}: layer {index} is {entry['name']!r} there but {site.name!r} in the model"
            )
        placed.append((entry, site))
    return placed


def _replay(
    model: nn.Module, record: dict[str, Any], header: Header, folder: Path
) -> list[tuple[MoEFFN, int]]:
    """Swap empty MoE layers of the recorded shapes (on the meta device) into ``model``, after
    comparing every recorded size with the weights' header."""
    where = folder / MOEFY_CONFIG_FILE
    moefy_config = record.get("moefy_config")
    try:
        config = None if moefy_config is None else MoEfyConfig.from_dict(moefy_config)
    except (TypeError, ValueError) as err:  # MoefyError included
        raise MoefyError(f"{where}: bad moefy_config ({err}): save the model again") from None
    placed = _placed_sites(model, record, where)
    problems = [
        (entry["index"], problem)
        for entry, site in placed
        if (problem := _layer_vs_weights(entry, site, header, WEIGHTS_FILE)) is not None
    ]
    _raise_first(where, problems, len(placed), "the files do not belong together; save again")
    names = {id(module): name for name, module in model.named_modules()}
    built: list[tuple[MoEFFN, int]] = []
    for entry, site in placed:
        with torch.device("meta"):  # the saved tensors are assigned to it when loaded
            moe = _empty_moe(site.weights(), entry, device="meta")
        moe.layer_index, moe.site_name = entry["index"], site.name
        moe.block_name = names[id(site.block)]
        moe.moefy_config = config
        moe.keep_dense_skeleton(replace_ffn(model, site, moe))
        built.append((moe, entry["d_ff"]))
    return built


def _finish(model: nn.Module, record: dict[str, Any], built: list[tuple[MoEFFN, int]]) -> None:
    for moe, d_ff in built:
        check_slots(moe.perm, d_ff)


register_format(
    ChangeFormat(
        name=FORMAT_NAME,
        file=MOEFY_CONFIG_FILE,
        rank=20,
        capture=_capture,
        read=_read_record,
        replay=_replay,
        finish=_finish,
        missing_hint="not a folder written by moefy.save of a moefied model",
    )
)
