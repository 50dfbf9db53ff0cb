"""Save a moefied model to a folder and load it back, with no re-clustering.

A folder holds the Hugging Face ``config.json`` (plus ``generation_config.json`` and the
tokenizer files when there are any), ``model.safetensors`` with the whole state dict (the MoE
weights, slot permutations and selector state included; tied weights stored once) and
``moefy_config.json``: the format version, the :class:`MoEfyConfig`, the model class and dtype,
and per MoE layer its place, E, S and selector settings. Loading builds the base model from its
config, swaps in empty MoE layers of the recorded shapes and loads the state dict strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moefy.arch import find_ffns, replace_ffn
from moefy.errors import MoefyError
from moefy.io import atomic_path
from moefy.models.hf_config import HF_CONFIG_FILE, read_hf_config
from moefy.moe.config import MoEfyConfig
from moefy.moe.convert import moe_layers
from moefy.moe.module import MoEFFN, check_slots
from moefy.moe.selectors import selector_from_dict

FORMAT_NAME = "moefy-moe"
FORMAT_VERSION = 1
MOEFY_CONFIG_FILE = "moefy_config.json"
WEIGHTS_FILE = "model.safetensors"

GENERATION_CONFIG_FILE = "generation_config.json"


def save(model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None) -> Path:
    """Write a moefied model to the folder ``path`` atomically (it replaces any old folder).

    Args:
        model: a moefied Hugging Face model.
        path: the output folder.
        tokenizer: optional tokenizer to save alongside.

    Returns:
        The folder path.

    Raises:
        MoefyError: the model has no MoE layers or no Hugging Face config.

    Example:
        >>> save(model, "runs/moe", tokenizer=tokenizer)
        >>> same = from_pretrained("runs/moe")
    """
    from safetensors.torch import save_model

    layers = moe_layers(model)
    if not layers:
        raise MoefyError("the model has no MoE layers; save a dense model with save_pretrained")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise MoefyError("save needs a Hugging Face model (one with a .config)")
    unplaced = [moe for moe in layers if not moe.site_name or moe.layer_index < 0]
    if unplaced:
        raise MoefyError("save needs MoE layers made by moefy_ or from_pretrained (with a place)")
    moefy_config = layers[0].moefy_config
    record = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "dtype": str(layers[0].w_in.dtype).removeprefix("torch."),
        "moefy_config": None if moefy_config is None else moefy_config.to_dict(),
        "layers": [moe.layer_record() for moe in layers],
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / MOEFY_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return path


def _read_record(folder: Path) -> dict[str, Any]:
    for name in (HF_CONFIG_FILE, WEIGHTS_FILE, MOEFY_CONFIG_FILE):
        if not (folder / name).is_file():
            raise MoefyError(f"{folder}: missing {name}; not a folder written by moefy.save")
    try:
        record = json.loads((folder / MOEFY_CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoefyError(f"{folder / MOEFY_CONFIG_FILE}: corrupt JSON ({err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise MoefyError(f"{folder / MOEFY_CONFIG_FILE}: not a moefy MoE config")
    if record.get("version") != FORMAT_VERSION:
        raise MoefyError(
            f"{folder / MOEFY_CONFIG_FILE}: format version {record.get('version')!r} is not "
            f"supported (this moefy reads version {FORMAT_VERSION})"
        )
    for key in ("model_class", "dtype", "layers"):
        if key not in record:
            raise MoefyError(f"{folder / MOEFY_CONFIG_FILE}: missing {key!r}")
    return record


def _build_base_model(folder: Path, record: dict[str, Any]) -> nn.Module:
    import transformers

    config = read_hf_config(folder)
    model_class = getattr(transformers, str(record["model_class"]), None)
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise MoefyError(f"model class {record['model_class']!r} is not a transformers model class")
    dtype = getattr(torch, str(record["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise MoefyError(f"unknown dtype {record['dtype']!r} in {MOEFY_CONFIG_FILE}")
    model = model_class(config).to(dtype)
    if (folder / GENERATION_CONFIG_FILE).is_file() and hasattr(model, "generation_config"):
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(folder))
    return model


def _empty_moe(site_weights: Any, entry: dict[str, Any]) -> MoEFFN:
    try:
        E, S = int(entry["num_experts"]), int(entry["expert_size"])
        gated, in_bias, out_bias = (
            bool(entry["gated"]),
            bool(entry["in_bias"]),
            bool(entry["out_bias"]),
        )
        d_ff = int(entry["d_ff"])
        selector_record = entry["selector"]
    except (KeyError, TypeError, ValueError) as err:
        raise MoefyError(f"{MOEFY_CONFIG_FILE}: malformed layer record ({err})") from None
    if d_ff != site_weights.d_ff or gated != site_weights.gated or d_ff > E * S:
        raise MoefyError(
            f"{MOEFY_CONFIG_FILE}: layer {entry.get('index')} records d_ff={d_ff}, gated={gated}, "
            f"{E}x{S} slots; the model config gives d_ff={site_weights.d_ff}, "
            f"gated={site_weights.gated}"
        )
    D = site_weights.d_model
    selector = selector_from_dict(selector_record, num_experts=E, d_model=D)
    return MoEFFN(
        D,
        E,
        S,
        gated=gated,
        act=site_weights.act,
        in_bias=in_bias,
        out_bias=out_bias,
        selector=selector,
        dtype=site_weights.w_up.dtype,
        device=site_weights.w_up.device,
    )


def from_pretrained(path: str | os.PathLike) -> nn.Module:
    """Load a model written by :func:`save`: same structure, same weights, same outputs.

    Args:
        path: the folder.

    Returns:
        The moefied model, in eval mode.

    Raises:
        MoefyError: missing or corrupt files, an unsupported format version, or weights whose
            names or shapes do not match the recorded structure.

    Example:
        >>> model = from_pretrained("runs/moe")
        >>> set_selection(model, fraction=0.25)
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    folder = Path(path)
    if not folder.is_dir():
        raise MoefyError(f"{folder}: no such folder")
    record = _read_record(folder)
    model = _build_base_model(folder, record)
    moefy_config = record.get("moefy_config")
    config = None if moefy_config is None else MoEfyConfig.from_dict(moefy_config)
    sites = find_ffns(model)
    names = {id(module): name for name, module in model.named_modules()}
    built: list[tuple[MoEFFN, int]] = []
    for entry in record["layers"]:
        index = entry.get("index") if isinstance(entry, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(sites):
            raise MoefyError(f"{MOEFY_CONFIG_FILE}: layer index {index!r} is not in this model")
        site = sites[index]
        if entry.get("name") != site.name:
            raise MoefyError(
                f"{MOEFY_CONFIG_FILE}: layer {index} is {entry.get('name')!r} there but "
                f"{site.name!r} in the model"
            )
        moe = _empty_moe(site.weights(), entry)
        moe.layer_index, moe.site_name, moe.block_name = index, site.name, names[id(site.block)]
        moe.moefy_config = config
        moe.keep_dense_skeleton(replace_ffn(model, site, moe))
        built.append((moe, int(entry["d_ff"])))
    try:
        load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    except (RuntimeError, SafetensorError, OSError) as err:
        raise MoefyError(
            f"{folder / WEIGHTS_FILE} does not match the recorded model: {err}"
        ) from None
    for moe, d_ff in built:
        check_slots(moe.perm, d_ff)
    return model.eval()
