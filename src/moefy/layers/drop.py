"""Drop attention sublayers, MLPs or whole blocks of a decoder in place, and put them back.

Dropping swaps modules (see :mod:`moefy.layers.modules`); the stand-ins keep the replaced modules
unless ``keep_weights=False``. What is dropped is read back from the module structure
(:func:`dropped_layers`), so nothing lives outside the model. Sublayers are dropped before blocks,
which is also the order :func:`moefy.layers.load_dropped` replays, so a saved state dict always
finds the same module tree.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from moefy.arch.spec import get_submodule, set_submodule
from moefy.errors import MoefyError
from moefy.layers.config import DropConfig
from moefy.layers.modules import DroppedAttention, DroppedBlock, DroppedMLP
from moefy.layers.sites import LayerSite, find_layers


def _is_dropped(module: nn.Module | None) -> bool:
    return bool(getattr(module, "moefy_dropped", False))


def _attention_dropped(site: LayerSite) -> bool:
    block = site.inner_block
    return block is not None and _is_dropped(get_submodule(block, site.attention_path))


def _mlp_dropped(site: LayerSite) -> bool:
    block = site.inner_block
    first_slot = next(iter(site.mlp_slots().values()))
    return block is not None and _is_dropped(get_submodule(block, first_slot))


def dropped_layers(model: nn.Module) -> DropConfig:
    """What is dropped in ``model``, read from its modules.

    Args:
        model: a supported decoder.

    Returns:
        A :class:`DropConfig`; sublayers inside a dropped block are listed when the block kept
        them. ``keep_weights`` is False when any stand-in freed its weights.

    Example:
        >>> drop_layers_(model, attention=[3])
        >>> dropped_layers(model).attention
        (3,)
    """
    sites = find_layers(model)
    stand_ins = []
    attention, mlp, blocks = [], [], []
    for site in sites:
        if _is_dropped(site.block):
            blocks.append(site.index)
            stand_ins.append(site.block)
        block = site.inner_block
        if block is None:
            continue
        if _attention_dropped(site):
            attention.append(site.index)
            stand_ins.append(get_submodule(block, site.attention_path))
        if _mlp_dropped(site):
            mlp.append(site.index)
            stand_ins.append(get_submodule(block, next(iter(site.mlp_slots().values()))))
    keep = all(module.base_layer is not None for module in stand_ins)
    return DropConfig(attention=attention, mlp=mlp, blocks=blocks, keep_weights=keep)


def _check_plan(sites: list[LayerSite], current: DropConfig, wanted: DropConfig) -> None:
    num_blocks = len(sites)
    for name, indices in (
        ("attention", wanted.attention),
        ("mlp", wanted.mlp),
        ("blocks", wanted.blocks),
    ):
        bad = [i for i in indices if i >= num_blocks]
        if bad:
            raise MoefyError(
                f"{name} layer {bad[0]} is out of range: the model has {num_blocks} blocks "
                f"(0..{num_blocks - 1})"
            )
    if not current.is_empty and current.keep_weights != wanted.keep_weights:
        raise MoefyError(
            f"the model already has layers dropped with keep_weights={current.keep_weights}; "
            "drop more with the same setting"
        )
    final = current.union(wanted)
    gone = set(final.blocks) | (set(final.attention) & set(final.mlp))
    if len(gone) == num_blocks:
        raise MoefyError(f"that would drop all {num_blocks} blocks; keep at least one")
    attending = set(range(num_blocks)) - set(final.blocks) - set(final.attention)
    if not attending:
        raise MoefyError(
            f"that would drop all {num_blocks} attention layers: the model could no longer read "
            "its context (nor track positions in its KV cache); keep at least one"
        )


def check_drop(model: nn.Module, plan: DropConfig) -> None:
    """Raise the :class:`MoefyError` that :func:`drop_layers_` would raise for ``plan``, if any.

    Args:
        model: a supported decoder, possibly with layers dropped already.
        plan: what would be dropped in addition.

    Example:
        >>> check_drop(model, DropConfig(blocks=range(30)))
        Traceback (most recent call last):
        moefy.errors.MoefyError: that would drop all 30 blocks; keep at least one
    """
    _check_plan(find_layers(model), dropped_layers(model), plan)


def _cache_index(attention: nn.Module, block_index: int) -> int:
    # transformers numbers the KV cache by the attention's layer_idx; blocks share the number.
    layer_idx = getattr(attention, "layer_idx", None)
    return layer_idx if isinstance(layer_idx, int) else block_index


def _drop_attention(site: LayerSite, keep_weights: bool) -> None:
    block = site.inner_block
    if block is None or _attention_dropped(site):
        return
    attention = get_submodule(block, site.attention_path)
    stand_in = DroppedAttention(
        _cache_index(attention, site.index), attention if keep_weights else None
    )
    set_submodule(block, site.attention_path, stand_in)


def _drop_mlp(site: LayerSite, keep_weights: bool) -> None:
    block = site.inner_block
    if block is None or _mlp_dropped(site):
        return
    slots = site.mlp_slots()
    replaced = nn.ModuleDict({slot: get_submodule(block, path) for slot, path in slots.items()})
    stand_in = DroppedMLP(site.index, replaced if keep_weights else None)
    for number, path in enumerate(slots.values()):
        set_submodule(block, path, stand_in if number == 0 else nn.Identity())


def _drop_block(site: LayerSite, keep_weights: bool) -> None:
    block = site.block
    if _is_dropped(block):
        return
    # a dropped attention stand-in carries the same layer_idx as the attention it replaced
    cache_index = _cache_index(get_submodule(block, site.attention_path), site.index)
    site.stack[site.index] = DroppedBlock(cache_index, block if keep_weights else None)


def drop_layers_(
    model: nn.Module,
    attention: Iterable[int] = (),
    mlp: Iterable[int] = (),
    blocks: Iterable[int] = (),
    *,
    keep_weights: bool = True,
) -> DropConfig:
    """Remove attention sublayers, MLPs or whole blocks of a decoder, in place.

    A dropped part computes nothing: the residual stream passes it unchanged. A dropped attention
    sublayer (or block) stores no KV cache: its cache slot holds transformers' ``DummyLayer`` (or
    :class:`moefy.layers.modules.EmptyCacheLayer` before transformers 5.23), so positions and
    masks come from the remaining attention layers and ``generate`` works, also when block 0's
    attention is gone. Calling it again drops more.

    Args:
        model: a supported decoder (see :func:`moefy.layers.find_layers`), dense, moefied or
            sparsified.
        attention: block numbers whose attention sublayer goes.
        mlp: block numbers whose MLP goes.
        blocks: block numbers that go whole.
        keep_weights: keep the removed modules inside their stand-ins (``base_layer``) so that
            :func:`restore_layers` can undo the drop; False frees their memory.

    Returns:
        Everything now dropped in ``model`` (:func:`dropped_layers`).

    Raises:
        MoefyError: a block number out of range, a plan that drops every block or every
            attention layer, or a ``keep_weights`` different from earlier drops.

    Example:
        >>> drop_layers_(model, attention=[20, 22, 24, 26])
        DropConfig(attention=(20, 22, 24, 26), mlp=(), blocks=(), keep_weights=True, version=1)
        >>> model.generate(input_ids, max_new_tokens=20)
    """
    sites = find_layers(model)
    wanted = DropConfig(attention=attention, mlp=mlp, blocks=blocks, keep_weights=keep_weights)
    _check_plan(sites, dropped_layers(model), wanted)
    for index in wanted.attention:
        _drop_attention(sites[index], keep_weights)
    for index in wanted.mlp:
        _drop_mlp(sites[index], keep_weights)
    for index in wanted.blocks:
        _drop_block(sites[index], keep_weights)
    return dropped_layers(model)


def _restore_attention(site: LayerSite) -> None:
    block = site.inner_block
    stand_in = get_submodule(block, site.attention_path)
    set_submodule(block, site.attention_path, stand_in.base_layer)


def _restore_mlp(site: LayerSite) -> None:
    block = site.inner_block
    stand_in = get_submodule(block, next(iter(site.mlp_slots().values())))
    for slot, path in site.mlp_slots().items():
        set_submodule(block, path, stand_in.base_layer[slot])


def restore_layers(
    model: nn.Module,
    attention: Iterable[int] | None = None,
    mlp: Iterable[int] | None = None,
    blocks: Iterable[int] | None = None,
) -> nn.Module:
    """Put dropped parts back, in place: all of them, or the ones named.

    Args:
        model: a model changed by :func:`drop_layers_` (or loaded by ``load_dropped``) with
            ``keep_weights=True``.
        attention, mlp, blocks: block numbers to restore; when all three are None, everything
            dropped is restored. Numbers that are not dropped are ignored.

    Returns:
        ``model``; with everything restored it computes what it did before the drop.

    Raises:
        MoefyError: a part to restore was dropped with ``keep_weights=False``.

    Example:
        >>> drop_layers_(model, blocks=[5])
        >>> restore_layers(model)
    """
    sites = find_layers(model)
    current = dropped_layers(model)
    if attention is None and mlp is None and blocks is None:
        chosen = current
    else:
        asked = DropConfig(attention=attention or (), mlp=mlp or (), blocks=blocks or ())
        chosen = DropConfig(
            attention=set(asked.attention) & set(current.attention),
            mlp=set(asked.mlp) & set(current.mlp),
            blocks=set(asked.blocks) & set(current.blocks),
        )
    if not chosen.is_empty and not current.keep_weights:
        raise MoefyError(
            "the layers were dropped with keep_weights=False, so their weights are gone: "
            "load the dense model again"
        )
    for index in chosen.blocks:  # blocks first: the sublayers of a dropped block live inside it
        site = sites[index]
        site.stack[index] = site.block.base_layer
    for index in chosen.attention:
        _restore_attention(sites[index])
    for index in chosen.mlp:
        _restore_mlp(sites[index])
    return model
