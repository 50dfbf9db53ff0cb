"""Which layers to drop: the most redundant by similarity (LLM-Drop), or a balanced set of middle
blocks (Unified Layer Skipping), and the one call the evaluation sweep makes.

Unified Layer Skipping (Liu et al., 2024) skips the same blocks for every token, spread evenly
through the middle of the stack and never the first or last block, with as many blocks as a
target speedup asks: keeping ``L / speedup`` of ``L`` blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.layers.config import DropConfig
from moefy.layers.drop import drop_layers_
from moefy.layers.result import LayerImportance
from moefy.layers.sites import ATTENTION, BLOCK, MLP, find_layers
from moefy.registry import Registry

# Unified Layer Skipping keeps the first and the last block.
_KEPT_ENDS = 2


def plan_most_redundant(
    importance: LayerImportance, attention: int = 0, mlp: int = 0, blocks: int = 0
) -> DropConfig:
    """The ``n`` most redundant attention sublayers, MLPs and blocks by similarity.

    Args:
        importance: scores from :func:`moefy.layers.layer_importance`.
        attention, mlp, blocks: how many of each to drop.

    Returns:
        The :class:`DropConfig` to pass to :func:`drop_layers_` (``**plan.indices()``).

    Example:
        >>> plan = plan_most_redundant(importance, attention=4)
        >>> drop_layers_(model, **plan.indices())
    """
    return DropConfig(
        attention=importance.most_redundant(ATTENTION, attention),
        mlp=importance.most_redundant(MLP, mlp),
        blocks=importance.most_redundant(BLOCK, blocks),
    )


def blocks_for_speedup(num_blocks: int, speedup: float) -> int:
    """How many of ``num_blocks`` blocks to skip for a target speedup of the block stack.

    The ideal: a step costs in proportion to the blocks it runs (embedding and LM head ignored),
    so ``round(num_blocks * (1 - 1 / speedup))``.

    Example:
        >>> blocks_for_speedup(30, 1.5)
        10
    """
    if not isinstance(speedup, (int, float)) or isinstance(speedup, bool) or not speedup >= 1:
        raise MoefyError(f"speedup must be a number >= 1, got {speedup!r}")
    return round(num_blocks * (1.0 - 1.0 / speedup))


def plan_uniform_skip(num_blocks: int, n: int) -> DropConfig:
    """Unified Layer Skipping: ``n`` blocks spread evenly over blocks 1..num_blocks-2.

    Args:
        num_blocks: blocks in the model.
        n: blocks to skip, 0..num_blocks-2.

    Returns:
        A :class:`DropConfig` with ``blocks`` set.

    Example:
        >>> plan_uniform_skip(30, 4).blocks
        (4, 11, 18, 25)
    """
    middle = num_blocks - _KEPT_ENDS
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= max(middle, 0):
        raise MoefyError(
            f"skip keeps the first and last block: skip 0..{max(middle, 0)} of {num_blocks} "
            f"blocks, got {n!r}"
        )
    step = middle / n if n else 0.0
    # the centre of each of n equal stretches of the middle blocks (distinct: step >= 1)
    return DropConfig(blocks=[1 + int((k + 0.5) * step) for k in range(n)])


Planner = Callable[[nn.Module, int, LayerImportance | None], DropConfig]


@dataclass(frozen=True)
class LayerMethod:
    """One layer method of the sweep.

    Attributes:
        plan: ``(model, level, importance) -> DropConfig``.
        needs_importance: the plan reads similarity scores.
    """

    plan: Planner
    needs_importance: bool


def _most_redundant(part: str) -> Planner:
    def plan(model: nn.Module, level: int, importance: LayerImportance | None) -> DropConfig:
        if importance is None:
            raise MoefyError(
                f"dropping the most redundant {part} layers needs their similarities: "
                "pass importance=layer_importance(model, blocks) or calibration=blocks"
            )
        num_blocks = len(find_layers(model))
        if importance.num_blocks != num_blocks:
            raise MoefyError(
                f"the importance scores cover {importance.num_blocks} blocks, the model has "
                f"{num_blocks}: measure this model"
            )
        return plan_most_redundant(importance, **{_COUNT_ARGUMENT[part]: level})

    return plan


def _uniform_skip(model: nn.Module, level: int, _importance: LayerImportance | None) -> DropConfig:
    return plan_uniform_skip(len(find_layers(model)), level)


_COUNT_ARGUMENT = {ATTENTION: "attention", MLP: "mlp", BLOCK: "blocks"}

# method name, as `moefy sweep` spells it -> how it chooses the layers; ``meta["kept"]`` is how
# many blocks the method always keeps (so a level above ``num_blocks - kept`` is refused early)
LAYER_METHODS: Registry[LayerMethod] = Registry("layer method")


def _register_llm_drop(name: str, kind: str, layers: str) -> None:
    """LLM-Drop for one kind of layer: drop the ``level`` most redundant ones."""
    LAYER_METHODS.register(
        name,
        LayerMethod(_most_redundant(kind), needs_importance=True),
        help=f"drop the {layers} most similar to their input (LLM-Drop)",
        kept=0,
    )


_register_llm_drop("drop-attn", ATTENTION, "attention sublayers")
_register_llm_drop("drop-mlp", MLP, "MLPs")
_register_llm_drop("drop-block", BLOCK, "blocks")
LAYER_METHODS.register(
    "skip",
    LayerMethod(_uniform_skip, needs_importance=False),
    help="skip blocks spread through the middle (Unified Layer Skipping)",
    kept=_KEPT_ENDS,
)


def apply_layer_method(
    model: nn.Module,
    method: str,
    level: int,
    importance: LayerImportance | None = None,
    *,
    calibration: TokenBlocks | None = None,
) -> DropConfig:
    """Drop ``level`` layers of ``model`` in place by one of the layer methods.

    Methods: ``drop-attn``, ``drop-mlp``, ``drop-block`` (the ``level`` most redundant attention
    sublayers, MLPs or blocks by similarity) and ``skip`` (Unified Layer Skipping: ``level``
    blocks spread through the middle). It composes with the FFN methods: ``drop-attn`` and
    ``skip``/``drop-block`` work on moefied or sparsified models, and a model with attention
    dropped can be moefied or sparsified; apply ``drop-mlp``/``drop-block`` last, as the FFN
    verbs refuse dropped MLPs.

    Args:
        model: a supported decoder.
        method: a name in :data:`LAYER_METHODS` (a :class:`moefy.registry.Registry`).
        level: number of layers to drop (0: nothing).
        importance: scores of ``model`` from :func:`moefy.layers.layer_importance`.
        calibration: token blocks to measure the scores on when ``importance`` is not given
            and the method needs them.

    Returns:
        Everything now dropped in ``model``.

    Raises:
        MoefyError: an unknown method, a level out of range, or no scores and no calibration
            text for a method that needs them.

    Example:
        >>> apply_layer_method(model, "drop-attn", 4, calibration=calibration_blocks)
        >>> apply_layer_method(other_model, "skip", 8)
    """
    layer_method = LAYER_METHODS.get(method).value
    if layer_method.needs_importance and importance is None and calibration is not None:
        from moefy.layers.importance import layer_importance

        importance = layer_importance(model, calibration)
    return drop_layers_(model, **layer_method.plan(model, level, importance).indices())
