"""Where a decoder keeps its blocks and their attention and MLP sublayers: one site per block.

Everything comes from the architecture table (:mod:`moefy.arch`): the block stack and FFN slot of
``FFNSpec.stacks``, the attention path of ``FFNSpec.attention``. Sites hold the stack and the
block number rather than the block itself, because dropping a block swaps the module in the stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moefy.arch import FFNSpec, get_spec, model_type_of
from moefy.arch.registry import _resolve_stack
from moefy.arch.spec import get_submodule
from moefy.errors import MoefyError

# The parts of a block that can be measured and dropped, in the order tables show them.
ATTENTION, MLP, BLOCK = "attention", "mlp", "block"
PARTS = (ATTENTION, MLP, BLOCK)


@dataclass(frozen=True)
class LayerSite:
    """One block of a decoder.

    Attributes:
        index: block number, from the input side.
        name: dotted path of the block from the model root.
        stack: the ``ModuleList`` that holds the blocks.
        spec: the architecture's spec (FFN slot and parts).
        attention_path: path of the attention sublayer inside the block.
        attention_out_path: path of the module whose output attention adds to the residual
            stream (the attention itself, or Gemma 2's post-attention norm).
        mlp_path: path of the MLP slot inside the block (``""`` for an inline FFN such as OPT's).
    """

    index: int
    name: str
    stack: nn.ModuleList
    spec: FFNSpec
    attention_path: str
    attention_out_path: str
    mlp_path: str

    @property
    def block(self) -> nn.Module:
        """The module in the stack now: the block, or what stands in for it once dropped."""
        return self.stack[self.index]

    @property
    def inner_block(self) -> nn.Module | None:
        """The original block: the block itself, or the one a dropped block keeps (else None)."""
        block = self.block
        if getattr(block, "moefy_dropped", False):
            return getattr(block, "base_layer", None)
        return block

    def attention(self) -> nn.Module:
        """The attention sublayer of the original block (or its stand-in, once dropped)."""
        block = self.inner_block
        if block is None:
            raise MoefyError(f"{self.name}: the block was dropped without keeping its weights")
        return get_submodule(block, self.attention_path)

    def mlp_slots(self) -> dict[str, str]:
        """Slot name -> path inside the block of the modules an MLP drop replaces.

        ``{"ffn": path}`` for an FFN module; for an inline FFN its ``up``, ``gate``, ``act``
        and ``down`` parts (the block calls them one after the other).
        """
        if not self.spec.inline:
            return {"ffn": self.mlp_path}
        return {
            part: path
            for part in ("up", "gate", "act", "down")
            if (path := getattr(self.spec, part)) is not None
        }


def find_layers(model: nn.Module) -> list[LayerSite]:
    """The blocks of a decoder-only model, in order.

    Args:
        model: a model whose architecture is registered with an attention path
            (``FFNSpec.attention``): every decoder in the built-in table.

    Returns:
        One :class:`LayerSite` per block.

    Raises:
        MoefyError: an unregistered architecture, an encoder-decoder (two stacks), or a spec with
            no attention path.

    Example:
        >>> [site.name for site in find_layers(model)][:2]
        ['model.layers.0', 'model.layers.1']
    """
    spec = get_spec(model)
    model_type = model_type_of(model)
    if len(spec.stacks) != 1 or spec.attention is None:
        raise MoefyError(
            f"{model_type}: layer redundancy works on decoder-only models whose spec names the "
            "attention sublayer; register one with FFNSpec(..., attention='self_attn')"
        )
    blocks_path, mlp_path = spec.stacks[0]
    if not mlp_path and not spec.inline:
        raise MoefyError(f"{model_type}: the FFN is the whole block; MLPs cannot be told apart")
    resolved = _resolve_stack(model, blocks_path)
    if resolved is None or not isinstance(resolved[1], nn.ModuleList):
        raise MoefyError(
            f"{model_type}: no block list at {blocks_path!r}; the registered FFNSpec does not "
            "match this model"
        )
    full_path, stack = resolved
    return [
        LayerSite(
            index=i,
            name=f"{full_path}.{i}",
            stack=stack,
            spec=spec,
            attention_path=spec.attention,
            attention_out_path=spec.attention_out or spec.attention,
            mlp_path=mlp_path,
        )
        for i in range(len(stack))
    ]
