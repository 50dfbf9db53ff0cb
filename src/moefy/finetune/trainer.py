"""The finetune trainer: setup (optimiser, frozen parts, resume), one optimiser step, checkpoint.

:func:`moefy.finetune.finetune` drives it: it checks the arguments, builds a :class:`Trainer`,
and steps it until the budget is spent, showing progress.

Shape legend:
    B: blocks per micro-batch, T: block length, V: vocabulary
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.dist import all_reduce_sum_
from moefy.errors import MoefyError
from moefy.finetune.checkpoint import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    append_log,
    save_checkpoint,
)
from moefy.finetune.config import FinetuneConfig
from moefy.finetune.moe_aware import (
    RoutedTraining,
    active_share,
    efficiency_penalty,
    router_hits,
    router_loss,
)
from moefy.finetune.regularizers import penalty, weight_at
from moefy.finetune.schedule import BlockOrder, budget_progress, lr_at, stopped_by
from moefy.finetune.sparsity import hook_activations
from moefy.models.weights import state_dict_error
from moefy.moe.convert import moe_layers

# the running sums of one optimiser step, in this order
_SUMS = (
    "loss",
    "lm_loss",
    "reg",
    "distill_kl",
    "router_loss",
    "efficiency",
    "zeros",
    "activations",
    "experts_run",
    "expert_slots",
    "micro_batches",
    "router_hits",
    "router_choices",
)
_INDEX = {name: i for i, name in enumerate(_SUMS)}


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student); both (B, T, V)."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _ratio(part: torch.Tensor, whole: torch.Tensor) -> float:
    return float(part) / float(whole) if float(whole) else float("nan")


def _router_param_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of the model's MoE selectors (its routers)."""
    return {id(p) for m in moe_layers(model) for p in m.selector.parameters()}


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


class Trainer:
    """One finetune run of ``model`` on this rank's ``shard``: optimiser, position, log rows.

    Args:
        model: the causal LM being trained (in place).
        shard: this rank's training blocks.
        config: the run's settings.
        teacher: the distillation teacher (frozen here), or None.
        folder: where checkpoints and the log go, or None for neither.
        rank, world: this process and the number of processes.

    Example:
        >>> trainer = Trainer(model, blocks, FinetuneConfig(max_steps=10), teacher=None,
        ...                   folder=None, rank=0, world=1)
        >>> with trainer.training():
        ...     row = trainer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        shard: TokenBlocks,
        config: FinetuneConfig,
        *,
        teacher: nn.Module | None,
        folder: Path | None,
        rank: int,
        world: int,
    ) -> None:
        self.model, self.shard, self.config, self.teacher = model, shard, config, teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.folder, self.rank, self.world = folder, rank, world
        self.routed_model = bool(moe_layers(model))
        self.frozen = _freeze_all_but_routers(model) if config.train == "routers" else []
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, config), lr=config.lr, weight_decay=config.weight_decay
        )
        self.steps = self.tokens = 0
        self.seconds = 0.0
        self.order = BlockOrder(shard.num_blocks, config.seed + rank)
        self.resumed_from = 0
        self.history: list[dict[str, float]] = []
        self._pending: list[dict[str, float]] = []  # log rows not yet written
        self._log_started = False  # a fresh run truncates the log on its first write
        self._acts: list[torch.Tensor] = []  # FFN activation outputs of the current forward
        self._routed: RoutedTraining | None = None
        self._start = 0.0

    # ------------------------------------------------------------------ setup

    def resume(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint ``state`` (see :func:`load_checkpoint`), or seed a fresh
        run when it is None."""
        if state is None:
            torch.manual_seed(self.config.seed)
            return
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.steps, self.tokens = int(state["steps"]), int(state["tokens"])
            self.seconds = float(state["seconds"])
            self.order = BlockOrder(
                self.shard.num_blocks,
                self.config.seed + self.rank,
                int(state["epoch"]),
                int(state["position"]),
            )
            torch.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, TypeError, KeyError) as err:
            where = (
                "the checkpoint"
                if self.folder is None
                else self.folder / CHECKPOINT_DIR / CHECKPOINT_FILE
            )
            raise MoefyError(
                f"{where} does not fit this model "
                f"({state_dict_error(err)}): give the model the run started from, or another "
                "--out to start afresh"
            ) from None
        self.resumed_from = self.steps

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """The model in training mode with the activation hooks (and, for a moefied model, the
        routed forward) in place; all of it undone on exit, frozen parameters given back."""
        was_training = self.model.training
        try:
            with contextlib.ExitStack() as hooks:
                hooks.enter_context(hook_activations(self.model, self._acts.append))
                if self.routed_model:
                    self._routed = hooks.enter_context(
                        RoutedTraining(self.model, straight_through=self.config.straight_through)
                    )
                self.model.train()
                self._start = time.perf_counter() - self.seconds
                yield
        finally:
            self._routed = None
            self.model.train(was_training)
            self.unfreeze()

    def unfreeze(self) -> None:
        """Give back the gradients :attr:`frozen` stopped (idempotent)."""
        for p in self.frozen:
            p.requires_grad_(True)
        self.frozen = []

    # ------------------------------------------------------------------ progress

    def progress(self) -> float:
        """The share of the budget spent (1 or more: done)."""
        return budget_progress(self.config, self.steps, self.tokens, self.seconds)

    def stopped_by(self) -> str | None:
        """The budget that is spent, or None."""
        return stopped_by(self.config, self.steps, self.tokens, self.seconds)

    # ------------------------------------------------------------------ one step

    def step(self) -> dict[str, float] | None:
        """One optimiser step over ``grad_accum`` micro-batches; the log row when this step
        logs one (every ``log_every`` steps and on the last), else None."""
        config = self.config
        share = self.progress()
        lr = lr_at(config, self.steps, share)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        reg_weight = weight_at(config.reg, share, config.reg_weight, config.reg_stages)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        for _ in range(config.grad_accum):
            sums += self._micro_batch(reg_weight)
        if self.world > 1:
            for p in self.params:
                if p.grad is not None:
                    all_reduce_sum_(p.grad).div_(self.world)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        self._update_seconds()
        if self.steps % config.log_every and not self.stopped_by():
            return None
        return self._log_row(sums, lr, reg_weight)

    def _micro_batch(self, reg_weight: float) -> torch.Tensor:
        """Forward and backward of one micro-batch; its (len(_SUMS),) float64 sums."""
        config, device = self.config, next(self.model.parameters()).device
        ids = self.shard.input_ids[self.order.take(config.batch_size)].to(device)  # (B, T)
        logits = self.model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        lm_loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
        )
        zero = torch.zeros((), device=device)
        loss, reg, kl, r_loss, efficiency = lm_loss, zero, zero, zero, zero
        if config.reg != "none":
            reg = penalty(config.reg, self._acts)
            loss = loss + reg_weight * reg
        ran = slots = hits = choices = 0
        if self._routed is not None:
            records = self._routed.take()
            r_loss, efficiency = router_loss(records), efficiency_penalty(records)
            loss = loss + config.router_loss * r_loss + config.efficiency * efficiency
            ran, slots = active_share(records)
            hits, choices = router_hits(records)
        if config.distill > 0 and self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
            kl = distill_kl(logits, teacher_logits)
            loss = loss + config.distill * kl
        (loss / config.grad_accum).backward()
        with torch.no_grad():
            zeros = sum(int((a == 0).sum()) for a in self._acts)
            entries = sum(a.numel() for a in self._acts)
        self._acts.clear()
        self.tokens += ids.numel() * self.world
        terms = (loss, lm_loss, reg, kl, r_loss, efficiency)
        return torch.tensor(
            [float(t.detach()) for t in terms] + [zeros, entries, ran, slots, 1.0, hits, choices],
            dtype=torch.float64,
        )

    def _update_seconds(self) -> None:
        self.seconds = time.perf_counter() - self._start
        if self.world > 1:  # every rank must stop on the same step (the clocks differ)
            total = all_reduce_sum_(torch.tensor([self.seconds], dtype=torch.float64))
            self.seconds = float(total[0]) / self.world

    def _log_row(self, sums: torch.Tensor, lr: float, reg_weight: float) -> dict[str, float]:
        all_reduce_sum_(sums)
        s = {name: sums[i] for name, i in _INDEX.items()}
        n = float(s["micro_batches"])
        row = {
            "step": self.steps,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "lr": lr,
            "loss": float(s["loss"]) / n,
            "lm_loss": float(s["lm_loss"]) / n,
            "reg_weight": reg_weight,
            "reg": float(s["reg"]) / n,
            "distill_kl": float(s["distill_kl"]) / n,
            "exact_zero": float(s["zeros"]) / max(float(s["activations"]), 1.0),
            "router_loss": float(s["router_loss"]) / n,
            "efficiency": float(s["efficiency"]) / n,
            "active_experts": _ratio(s["experts_run"], s["expert_slots"]),
            "router_recall": _ratio(s["router_hits"], s["router_choices"]),
        }
        self.history.append(row)
        self._pending.append(row)
        return row

    # ------------------------------------------------------------------ checkpoint

    def checkpoint(self) -> None:
        """Write the checkpoint and the pending log rows (rank 0; nothing without a folder)."""
        if self.folder is None or self.rank != 0:
            return
        save_checkpoint(
            self.folder,
            {
                "config": self.config.to_dict(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "steps": self.steps,
                "tokens": self.tokens,
                "seconds": self.seconds,
                "epoch": self.order.epoch,
                "position": self.order.position,
                "rng": torch.get_rng_state(),
            },
        )
        fresh = self.resumed_from == 0 and not self._log_started
        append_log(self.folder, self._pending, fresh=fresh)
        self._log_started = True
        self._pending.clear()
