"""``finetune``: a plain-torch training loop that raises FFN activation sparsity.

Loss per micro-batch = next-token cross-entropy + weight(progress) * penalty(FFN activations)
+ distill * KL(teacher || student). On a moefied model only the experts its routers select run,
and router_loss * (the routers' fit to the true expert norms) + efficiency * (Hoyer of the expert
norms) join the loss (MoE-aware fine-tuning, :mod:`moefy.finetune.moe_aware`). AdamW, linear
warm-up then cosine decay to 10 % of the peak learning rate, gradient clipping. Under
``torchrun`` every rank trains on its strided shard of the blocks and gradients are averaged with
an all-reduce before each step, so all ranks hold the same weights. Checkpoints (model,
optimiser, step, data position, elapsed time, random state) are written atomically; a run
started again with the same folder and config resumes from the last one and continues the same
run.

Shape legend:
    B: blocks per micro-batch, T: block length, V: vocabulary, F: FFN width
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.dist import all_reduce_sum_, rank_and_world
from moefy.errors import MoefyError, check_config
from moefy.finetune.config import FinetuneConfig
from moefy.finetune.moe_aware import (
    RoutedTraining,
    active_share,
    all_experts_teacher,
    efficiency_penalty,
    router_hits,
    router_loss,
)
from moefy.finetune.regularizers import penalty, weight_at
from moefy.finetune.sparsity import hook_activations
from moefy.io import FOLDER, check_output
from moefy.models.weights import state_dict_error
from moefy.moe.convert import moe_layers

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


@dataclass
class FinetuneReport:
    """What :func:`finetune` did.

    Attributes:
        config: the config of the run.
        steps: optimiser steps done in total (resumed ones included).
        tokens: training tokens seen in total (all ranks).
        seconds: training wall time in total (resumed runs included).
        stopped_by: the budget that ended the run (``max_steps``, ``max_tokens``, ``minutes``),
            or ``paused`` (``pause_after``).
        resumed_from: the step the run resumed from (0: a fresh run).
        history: the log rows of this call (see :data:`LOG_FIELDS`).
    """

    config: FinetuneConfig
    steps: int
    tokens: int
    seconds: float
    stopped_by: str
    resumed_from: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = asdict(self)
        data["config"] = self.config.to_dict()
        return data


def _lr_at(config: FinetuneConfig, step: int, progress: float) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _progress(config: FinetuneConfig, steps: int, tokens: int, seconds: float) -> float:
    used = []
    if config.max_steps is not None:
        used.append(steps / config.max_steps)
    if config.max_tokens is not None:
        used.append(tokens / config.max_tokens)
    if config.minutes is not None:
        used.append(seconds / (60.0 * config.minutes))
    return max(used)


def _stopped_by(config: FinetuneConfig, steps: int, tokens: int, seconds: float) -> str | None:
    if config.max_steps is not None and steps >= config.max_steps:
        return "max_steps"
    if config.max_tokens is not None and tokens >= config.max_tokens:
        return "max_tokens"
    if config.minutes is not None and seconds >= 60.0 * config.minutes:
        return "minutes"
    return None


def _distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student); both (B, T, V)."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


class _Order:
    """The seeded order of this rank's blocks, epoch after epoch; its position is resumable."""

    def __init__(self, n_blocks: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.n_blocks, self.seed, self.epoch, self.position = n_blocks, seed, epoch, position
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n_blocks, generator=gen).tolist()

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position >= self.n_blocks:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self._perm[self.position])
            self.position += 1
        return out


def _ratio(part: torch.Tensor, whole: torch.Tensor) -> float:
    return float(part) / float(whole) if float(whole) else float("nan")


def _param_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: the routers (MoE selectors) at ``router_lr``, the rest at ``lr``;
    each group's ``lr_scale`` follows the one schedule."""
    routers = _router_param_ids(model)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scale = 1.0 if config.router_lr is None else config.router_lr / config.lr
    groups = [
        {"params": [p for _, p in trained if id(p) not in routers], "lr_scale": 1.0},
        {"params": [p for _, p in trained if id(p) in routers], "lr_scale": scale},
    ]
    return [g for g in groups if g["params"]]


def _router_param_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of the model's MoE selectors (its routers)."""
    return {id(p) for m in moe_layers(model) for p in m.selector.parameters()}


def _freeze_all_but_routers(model: nn.Module) -> list[nn.Parameter]:
    """Stop gradients to every trainable parameter outside the MoE selectors; the ones
    stopped, to be given back after training.

    Raises:
        MoefyError: the selectors have no trainable weights (nothing is frozen then).
    """
    routers = _router_param_ids(model)
    if not any(p.requires_grad for p in model.parameters() if id(p) in routers):
        raise MoefyError(
            "nothing to train: the model's selectors have no weights (train-routers gives it "
            "learned routers)"
        )
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in routers]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _check_data(data: TokenBlocks, config: FinetuneConfig, world: int) -> None:
    if not isinstance(data, TokenBlocks):
        raise MoefyError(f"data must be TokenBlocks (load_text(...).blocks(...)), got {data!r}")
    needed = config.batch_size * world
    if data.num_blocks < needed or data.block_len < 2:
        raise MoefyError(
            f"training text too short: {data.num_blocks} blocks of {data.block_len} tokens, need "
            f"at least {needed} blocks of >= 2 tokens (batch_size x processes): give more text"
        )


def _load_checkpoint(folder: Path, config: FinetuneConfig) -> dict[str, Any] | None:
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


def _save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    from moefy.io import atomic_path

    target = folder / CHECKPOINT_DIR
    target.mkdir(parents=True, exist_ok=True)
    with atomic_path(target / CHECKPOINT_FILE, overwrite=True) as tmp:
        torch.save(state, tmp)


def _append_log(folder: Path, rows: list[dict[str, float]], fresh: bool) -> None:
    path = folder / LOG_FILE
    new_file = fresh or not path.is_file()
    with open(path, "w" if new_file else "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=LOG_FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def finetune(
    model: nn.Module,
    data: TokenBlocks,
    config: FinetuneConfig,
    *,
    out: str | os.PathLike | None = None,
    teacher: nn.Module | None = None,
    pause_after: int | None = None,
    progress: bool = False,
) -> FinetuneReport:
    """Train ``model`` in place on ``data`` with a sparsity regulariser (see module docstring).

    Args:
        model: a causal LM with dense FFNs (often after :func:`relufy_`), or a moefied one
            (then trained with its selection in the loop: MoE-aware fine-tuning).
        data: training blocks (``load_text(...).blocks(tokenizer, "calibration", ...)``).
        config: budget, optimiser and regulariser.
        out: a folder for checkpoints and ``train_log.csv``; when it holds a checkpoint of the
            same settings, training resumes from it. None: no checkpoints, no log file.
        teacher: the distillation teacher; default (with ``config.distill > 0``) a frozen copy
            of ``model`` as it is on entry, taken before a checkpoint is loaded (so resuming
            with the original model keeps the same teacher); for a moefied model the copy runs
            every expert (the dense FFN, exactly).
        pause_after: stop (with a checkpoint) once this many steps are done in total, as an
            interruption would, without changing the schedule the budget sets; call again with
            the same ``out`` to continue (``stopped_by`` is then ``"paused"``).
        progress: show a progress bar (rank 0).

    Returns:
        A :class:`FinetuneReport`.

    Raises:
        MoefyError: a model that is not a causal LM or not supported, training text too short,
            a checkpoint of other settings.

    Example:
        >>> relufy_(model)
        >>> finetune(model, blocks, FinetuneConfig(minutes=15, reg="prosparse"), out="runs/relu")
        >>> moe = moefy.load_model("runs/moe-routed")[0]  # MoE-aware: routers in the loop
        >>> set_routing(moe, "topk", fraction=0.25)
        >>> finetune(moe, blocks, FinetuneConfig(minutes=15, reg="none", efficiency=0.1))
    """
    from tqdm.auto import tqdm

    from moefy.models.load import is_causal_lm

    check_config(config, FinetuneConfig)
    if not is_causal_lm(model):
        raise MoefyError(f"finetune trains causal LMs; {type(model).__name__} is not one")
    rank, world = rank_and_world()
    _check_data(data, config, world)
    shard = data.shard(rank, world)
    # a folder moefy did not write is refused before any work; moefy's own is resumed
    folder = None if out is None else check_output(out, FOLDER, resume=True, option="out")
    state = None if folder is None else _load_checkpoint(folder, config)
    routed_model = bool(moe_layers(model))
    if config.efficiency > 0 and not routed_model:
        raise MoefyError(
            "the efficiency term applies to moefied models (moefy convert, then train-routers); "
            "this model has dense FFNs: use --reg for neuron sparsity"
        )
    for name, wanted in (
        ("straight_through", config.straight_through is not None),
        ("train='routers'", config.train == "routers"),
    ):
        if wanted and not routed_model:
            raise MoefyError(
                f"{name} trains routers: give a moefied model with routers (moefy convert, "
                "then train-routers)"
            )
    if config.distill > 0 and teacher is None:  # the model as it is on entry, before a resume
        teacher = all_experts_teacher(model) if routed_model else copy.deepcopy(model)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    frozen = _freeze_all_but_routers(model) if config.train == "routers" else []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        _param_groups(model, config), lr=config.lr, weight_decay=config.weight_decay
    )
    steps = tokens = 0
    seconds = 0.0
    order = _Order(shard.num_blocks, config.seed + rank)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            steps, tokens = int(state["steps"]), int(state["tokens"])
            seconds = float(state["seconds"])
            order = _Order(
                shard.num_blocks, config.seed + rank, int(state["epoch"]), int(state["position"])
            )
            torch.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, TypeError, KeyError) as err:
            raise MoefyError(
                f"{folder / CHECKPOINT_DIR / CHECKPOINT_FILE} does not fit this model "
                f"({state_dict_error(err)}): give the model the run started from, or another "
                "--out to start afresh"
            ) from None
    else:
        torch.manual_seed(config.seed)
    resumed_from = steps
    device = next(model.parameters()).device
    acts: list[torch.Tensor] = []  # FFN activation outputs of the current forward
    hooks = contextlib.ExitStack()
    hooks.enter_context(hook_activations(model, acts.append))
    routed = (
        hooks.enter_context(RoutedTraining(model, straight_through=config.straight_through))
        if routed_model
        else None
    )
    history: list[dict[str, float]] = []
    pending: list[dict[str, float]] = []
    was_training = model.training
    model.train()
    bar = tqdm(
        total=100,
        desc="finetune",
        unit="%",
        disable=not progress or rank != 0,
        bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]",
    )
    start = time.perf_counter() - seconds
    log_started: list[bool] = []  # truthy once this call wrote the log (a fresh run truncates it)

    def checkpoint() -> None:
        if folder is None:
            return
        if rank == 0:
            _save_checkpoint(
                folder,
                {
                    "config": config.to_dict(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "steps": steps,
                    "tokens": tokens,
                    "seconds": seconds,
                    "epoch": order.epoch,
                    "position": order.position,
                    "rng": torch.get_rng_state(),
                },
            )
            _append_log(folder, pending, fresh=resumed_from == 0 and not log_started)
            log_started.append(True)
            pending.clear()

    stopped = _stopped_by(config, steps, tokens, seconds)
    try:
        while stopped is None:
            share = _progress(config, steps, tokens, seconds)
            lr = _lr_at(config, steps, share)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            reg_weight = weight_at(config.reg, share, config.reg_weight, config.reg_stages)
            optimizer.zero_grad(set_to_none=True)
            # [loss, lm loss, reg, distill kl, router loss, efficiency, zeros, activations,
            #  experts run, expert slots, micro-batches, router hits, router choices]
            sums = torch.zeros(13, dtype=torch.float64)
            for _ in range(config.grad_accum):
                ids = shard.input_ids[order.take(config.batch_size)].to(device)  # (B, T)
                out_ = model(input_ids=ids, use_cache=False)
                logits = out_.logits  # (B, T, V)
                lm_loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
                )
                loss = lm_loss
                reg = torch.zeros((), device=device)
                if config.reg != "none":
                    reg = penalty(config.reg, acts)
                    loss = loss + reg_weight * reg
                r_loss = efficiency = torch.zeros((), device=device)
                ran = slots = hits = choices = 0
                if routed is not None:
                    records = routed.take()
                    r_loss, efficiency = router_loss(records), efficiency_penalty(records)
                    loss = loss + config.router_loss * r_loss + config.efficiency * efficiency
                    ran, slots = active_share(records)
                    hits, choices = router_hits(records)
                kl = torch.zeros((), device=device)
                if config.distill > 0 and teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=ids, use_cache=False).logits
                    kl = _distill_kl(logits, teacher_logits)
                    loss = loss + config.distill * kl
                (loss / config.grad_accum).backward()
                with torch.no_grad():
                    zeros = sum(int((a == 0).sum()) for a in acts)
                    entries = sum(a.numel() for a in acts)
                acts.clear()
                terms = (loss, lm_loss, reg, kl, r_loss, efficiency)
                sums += torch.tensor(
                    [float(t.detach()) for t in terms]
                    + [zeros, entries, ran, slots, 1.0, hits, choices],
                    dtype=torch.float64,
                )
                tokens += ids.numel() * world
            if world > 1:
                for p in params:
                    if p.grad is not None:
                        all_reduce_sum_(p.grad).div_(world)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            steps += 1
            seconds = time.perf_counter() - start
            if world > 1:  # every rank must stop on the same step (the clocks differ)
                seconds = float(all_reduce_sum_(torch.tensor([seconds], dtype=torch.float64))[0])
                seconds /= world
            if steps % config.log_every == 0 or _stopped_by(config, steps, tokens, seconds):
                all_reduce_sum_(sums)
                n = float(sums[10])
                row = {
                    "step": steps,
                    "tokens": tokens,
                    "seconds": round(seconds, 3),
                    "lr": lr,
                    "loss": float(sums[0]) / n,
                    "lm_loss": float(sums[1]) / n,
                    "reg_weight": reg_weight,
                    "reg": float(sums[2]) / n,
                    "distill_kl": float(sums[3]) / n,
                    "exact_zero": float(sums[6]) / max(float(sums[7]), 1.0),
                    "router_loss": float(sums[4]) / n,
                    "efficiency": float(sums[5]) / n,
                    "active_experts": _ratio(sums[8], sums[9]),
                    "router_recall": _ratio(sums[11], sums[12]),
                }
                history.append(row)
                pending.append(row)
                shown = {"loss": f"{row['lm_loss']:.3f}", "zeros": f"{row['exact_zero']:.1%}"}
                if routed is not None:
                    shown["experts"] = f"{row['active_experts']:.1%}"
                    shown["recall"] = f"{row['router_recall']:.1%}"
                bar.set_postfix(**shown, step=steps)
            bar.n = min(100.0, 100.0 * _progress(config, steps, tokens, seconds))
            bar.refresh()
            stopped = _stopped_by(config, steps, tokens, seconds)
            if stopped is None and pause_after is not None and steps >= pause_after:
                stopped = "paused"
            if config.checkpoint_every and steps % config.checkpoint_every == 0 and not stopped:
                checkpoint()
        checkpoint()
    finally:
        hooks.close()
        bar.close()
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(True)
    return FinetuneReport(
        config=config,
        steps=steps,
        tokens=tokens,
        seconds=seconds,
        stopped_by=stopped,
        resumed_from=resumed_from,
        history=history,
    )
