"""The fine-tuning config: budget, optimiser, sparsity regulariser, distillation, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moefy.errors import MoefyError
from moefy.finetune.regularizers import REGULARIZERS
from moefy.jsonconfig import JsonConfig
from moefy.validate import check_choice, check_int, is_finite

CONFIG_VERSION = 1
# what FinetuneConfig.train may name: every parameter, or a moefied model's routers only
TRAINED_PARTS = ("all", "routers")


@dataclass(frozen=True)
class FinetuneConfig(JsonConfig):
    """How :func:`moefy.finetune` trains.

    The run stops at the first budget reached (``max_steps``, ``max_tokens``, ``minutes``); at
    least one must be given. Progress through the budget drives ProSparse's schedule and the
    learning-rate decay.

    Attributes:
        max_steps: optimiser steps, or None.
        max_tokens: training tokens (all ranks), or None.
        minutes: wall-clock minutes, or None.
        lr: peak AdamW learning rate (linear warm-up, then cosine decay to 10 %).
        warmup_steps: steps of linear warm-up.
        weight_decay: AdamW weight decay.
        batch_size: blocks per micro-batch (per rank).
        grad_accum: micro-batches per optimiser step.
        max_grad_norm: gradient clipping norm (0: none).
        reg: sparsity regulariser: ``none``, ``l1``, ``hoyer`` or ``prosparse`` (L1 with the
            progressive staged schedule).
        reg_weight: the regulariser's weight (ProSparse: the final one).
        reg_stages: ProSparse's number of stages.
        distill: weight of KL(teacher || student) on the logits, with the model as it was
            before training as the teacher (0: plain language-model loss only); for a moefied
            model the teacher runs every expert.
        router_loss: moefied models: weight of the routers' fit to the true expert norms
            (0: routers stay as they are).
        router_lr: moefied models: peak learning rate of the routers (same schedule), or None
            for ``lr``; routers are small and start far from the adapted experts' norms, so a
            larger one (10x) lets them follow.
        efficiency: moefied models: weight of the Hoyer measure of each token's expert norms,
            which pushes its output mass into fewer experts (0: none).
        straight_through: moefied models: a temperature T > 0 with which the language-model
            and distillation losses train the routers too (straight-through estimator of the
            hard selection, see :func:`moefy.moe.module.straight_through_gates`), or None.
        train: ``all`` (every parameter) or ``routers`` (moefied models: the routers only, the
            rest frozen; with ``straight_through`` and ``distill`` this fits the routers end to
            end to the model with every expert).
        checkpoint_every: optimiser steps between checkpoints (0: only at the end).
        log_every: optimiser steps between log rows.
        seed: seed of the data order and of everything random in the run.
        version: config format version.

    Example:
        >>> FinetuneConfig(minutes=15, reg="prosparse", reg_weight=1e-2)
    """

    max_steps: int | None = None
    max_tokens: int | None = None
    minutes: float | None = None
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    reg: str = "prosparse"
    reg_weight: float = 1e-2
    reg_stages: int = 4
    distill: float = 0.0
    router_loss: float = 1.0
    router_lr: float | None = None
    efficiency: float = 0.0
    straight_through: float | None = None
    train: str = "all"
    checkpoint_every: int = 50
    log_every: int = 5
    seed: int = 0
    version: int = CONFIG_VERSION

    VERSION: ClassVar[int] = CONFIG_VERSION

    def __post_init__(self) -> None:
        budgets = {"max_steps": self.max_steps, "max_tokens": self.max_tokens}
        for name, value in budgets.items():
            if value is not None:
                check_int(name, value, minimum=1)
        if self.minutes is not None and not (is_finite(self.minutes) and self.minutes > 0):
            raise MoefyError(f"minutes must be > 0 and finite (or None), got {self.minutes!r}")
        if self.max_steps is None and self.max_tokens is None and self.minutes is None:
            raise MoefyError(
                "give a training budget: max_steps, max_tokens or minutes (--steps, --tokens, "
                "--minutes)"
            )
        if self.reg not in REGULARIZERS:
            raise MoefyError(f"unknown regulariser {self.reg!r}; known: {', '.join(REGULARIZERS)}")
        for name in (
            "lr",
            "weight_decay",
            "max_grad_norm",
            "reg_weight",
            "distill",
            "router_loss",
            "efficiency",
        ):
            value = getattr(self, name)
            if not (is_finite(value) and value >= 0):
                raise MoefyError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.lr > 0:
            raise MoefyError(f"lr must be > 0, got {self.lr}")
        if self.router_lr is not None and not (is_finite(self.router_lr) and self.router_lr > 0):
            raise MoefyError(f"router_lr must be > 0 and finite (or None), got {self.router_lr!r}")
        for name in ("batch_size", "grad_accum", "reg_stages", "log_every"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "checkpoint_every"):
            check_int(name, getattr(self, name), minimum=0)
        if self.straight_through is not None and not (
            is_finite(self.straight_through) and self.straight_through > 0
        ):
            raise MoefyError(
                f"straight_through must be a temperature > 0 (or None), got "
                f"{self.straight_through!r}"
            )
        check_choice("train", self.train, TRAINED_PARTS)
        if self.train == "routers" and self.straight_through is None and not self.router_loss:
            raise MoefyError(
                "train='routers' with router_loss 0 and no straight_through trains nothing: "
                "give --straight-through or a --router-loss above 0"
            )
        self.check_version()
