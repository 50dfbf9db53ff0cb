"""Finetune checkpoints and the training log: written atomically, read back only when they were
written with the same settings (the budget may change), never unpickled beyond plain values.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Any

import torch

from moefy.errors import MoefyError
from moefy.finetune.config import FinetuneConfig

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
LOG_FILE = "train_log.csv"
LOG_FIELDS = (
    "step",
    "tokens",
    "seconds",
    "lr",
    "loss",
    "lm_loss",
    "reg_weight",
    "reg",
    "distill_kl",
    "exact_zero",
    "router_loss",
    "efficiency",
    "active_experts",
    "router_recall",
)
# fields that may change between a run and its resumption (the budget can be extended)
_RESUMABLE_CHANGES = ("max_steps", "max_tokens", "minutes", "checkpoint_every", "log_every")
# what a checkpoint must hold to be resumed from
_CHECKPOINT_KEYS = (
    "config",
    "model",
    "optimizer",
    "steps",
    "tokens",
    "seconds",
    "epoch",
    "position",
    "rng",
)


def load_checkpoint(folder: Path, config: FinetuneConfig) -> dict[str, Any] | None:
    path = folder / CHECKPOINT_DIR / CHECKPOINT_FILE
    # refused here, before training, not when the first checkpoint is written over it
    for part, kind, is_kind in ((path.parent, "folder", Path.is_dir), (path, "file", Path.is_file)):
        if part.is_symlink() or (part.exists() and not is_kind(part)):
            raise MoefyError(
                f"{part} is not a regular {kind}, so no checkpoint can be written there: move it "
                "away, or give another --out"
            )
    if not path.is_file():
        return None
    # weights_only: a checkpoint holds tensors and plain values only, so nothing in the file can
    # run code while it is read (a crafted pickle is refused, not executed).
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise MoefyError(
            f"{path} holds more than tensors and plain values, which moefy never unpickles (it "
            "could run code): delete it to start afresh"
        ) from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user problem
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoefyError(f"{path} is unreadable ({reason}): delete it to start afresh") from None
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing or not isinstance(state["config"], dict):
        raise MoefyError(
            f"{path} is not a finetune checkpoint (lacks {', '.join(missing) or 'its config'}): "
            "delete it to start afresh"
        )
    try:
        saved = FinetuneConfig.from_dict(state["config"]).to_dict()
    except (TypeError, ValueError) as err:  # MoefyError included
        raise MoefyError(f"{path} holds a bad config ({err}): delete it to start afresh") from None
    mine = config.to_dict()
    differ = sorted(k for k in mine if k not in _RESUMABLE_CHANGES and saved.get(k) != mine[k])
    if differ:
        raise MoefyError(
            f"{path} was written with other settings ({', '.join(differ)}): use the same "
            "settings to resume, or another --out to start afresh"
        )
    return state


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    from moefy.io import atomic_path

    target = folder / CHECKPOINT_DIR
    target.mkdir(parents=True, exist_ok=True)
    with atomic_path(target / CHECKPOINT_FILE, overwrite=True) as tmp:
        torch.save(state, tmp)


def append_log(folder: Path, rows: list[dict[str, float]], fresh: bool) -> None:
    path = folder / LOG_FILE
    new_file = fresh or not path.is_file()
    with open(path, "w" if new_file else "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=LOG_FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
