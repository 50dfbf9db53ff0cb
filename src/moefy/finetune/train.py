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

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.dist import rank_and_world
from moefy.errors import MoefyError, check_config
from moefy.finetune.checkpoint import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    LOG_FIELDS,
    LOG_FILE,
    load_checkpoint,
)
from moefy.finetune.config import FinetuneConfig
from moefy.finetune.moe_aware import all_experts_teacher
from moefy.finetune.trainer import Trainer
from moefy.io import FOLDER, check_output
from moefy.moe.convert import moe_layers

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FILE",
    "LOG_FIELDS",
    "LOG_FILE",
    "FinetuneReport",
    "finetune",
]


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


def _check_data(data: TokenBlocks, config: FinetuneConfig, world: int) -> None:
    if not isinstance(data, TokenBlocks):
        raise MoefyError(f"data must be TokenBlocks (load_text(...).blocks(...)), got {data!r}")
    needed = config.batch_size * world
    if data.num_blocks < needed or data.block_len < 2:
        raise MoefyError(
            f"training text too short: {data.num_blocks} blocks of {data.block_len} tokens, need "
            f"at least {needed} blocks of >= 2 tokens (batch_size x processes): give more text"
        )


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
        >>> set_routing(moe, "topk", keep=0.25)
        >>> finetune(moe, blocks, FinetuneConfig(minutes=15, reg="none", efficiency=0.1))
    """
    from moefy.models.load import is_causal_lm

    check_config(config, FinetuneConfig)
    if not is_causal_lm(model):
        raise MoefyError(f"finetune trains causal LMs; {type(model).__name__} is not one")
    rank, world = rank_and_world()
    _check_data(data, config, world)
    # a folder moefy did not write is refused before any work; moefy's own is resumed
    folder = None if out is None else check_output(out, FOLDER, resume=True, option="out")
    state = None if folder is None else load_checkpoint(folder, config)
    routed_model = bool(moe_layers(model))
    _check_routed_settings(config, routed_model)
    if config.distill > 0 and teacher is None:  # the model as it is on entry, before a resume
        teacher = all_experts_teacher(model) if routed_model else copy.deepcopy(model)
    trainer = Trainer(
        model,
        data.shard(rank, world),
        config,
        teacher=teacher,
        folder=folder,
        rank=rank,
        world=world,
    )
    try:
        trainer.resume(state)
        stopped = _train(trainer, pause_after, show=progress and rank == 0)
    finally:
        trainer.unfreeze()
    return FinetuneReport(
        config=config,
        steps=trainer.steps,
        tokens=trainer.tokens,
        seconds=trainer.seconds,
        stopped_by=stopped,
        resumed_from=trainer.resumed_from,
        history=trainer.history,
    )


def _check_routed_settings(config: FinetuneConfig, routed_model: bool) -> None:
    """Settings that train routers need a moefied model."""
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


def _train(trainer: Trainer, pause_after: int | None, *, show: bool) -> str:
    """Step ``trainer`` until its budget is spent (or ``pause_after`` steps are done), with a
    progress bar and checkpoints; what stopped it."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=100,
        desc="finetune",
        unit="%",
        disable=not show,
        bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]",
    )
    every = trainer.config.checkpoint_every
    stopped = trainer.stopped_by()
    try:
        with trainer.training():
            while stopped is None:
                row = trainer.step()
                if row is not None:
                    bar.set_postfix(**_shown(row, trainer.routed_model), step=trainer.steps)
                bar.n = min(100.0, 100.0 * trainer.progress())
                bar.refresh()
                stopped = trainer.stopped_by()
                if stopped is None and pause_after is not None and trainer.steps >= pause_after:
                    stopped = "paused"
                if every and trainer.steps % every == 0 and not stopped:
                    trainer.checkpoint()
            trainer.checkpoint()
    finally:
        bar.close()
    return stopped


def _shown(row: dict[str, float], routed: bool) -> dict[str, str]:
    """The figures of a log row that the progress bar shows."""
    shown = {"loss": f"{row['lm_loss']:.3f}", "zeros": f"{row['exact_zero']:.1%}"}
    if routed:
        shown["experts"] = f"{row['active_experts']:.1%}"
        shown["recall"] = f"{row['router_recall']:.1%}"
    return shown
