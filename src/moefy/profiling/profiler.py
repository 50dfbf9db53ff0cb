"""``profile``: run a model over token blocks and measure the activation sparsity of its FFNs.

Shape legend:
    B: blocks in a batch, T: tokens per block, F: FFN width (d_ff)

A forward pre-hook on every FFN's down projection reads h, the (B, T, F) neuron activations, and
streams it into that layer's :class:`LayerAccumulator`, with the global index of each token (which
decides the tokens kept as activation patterns, see :mod:`moefy.profiling.patterns`). The hooks
live inside a context manager, so they are removed even when a forward pass raises.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from moefy.arch import FFNSite, find_ffns
from moefy.data.blocks import TokenBlocks
from moefy.dist import is_main_process, rank_and_world
from moefy.errors import MoefyError, check_config
from moefy.profiling.accumulators import LayerAccumulator
from moefy.profiling.config import ProfileConfig
from moefy.profiling.patterns import pattern_positions
from moefy.profiling.result import SparsityProfile, model_fingerprint


def profile(
    model: nn.Module, data: TokenBlocks, config: ProfileConfig | None = None
) -> SparsityProfile:
    """Measure the activation sparsity of every FFN layer of ``model`` on ``data``.

    Under torch.distributed each rank profiles ``data.shard(rank, world)`` and the sums are
    all-reduced (the activation patterns gathered), so every rank returns the result of a
    single-process run on all of ``data`` (up to float64 summation order). Memory does not grow
    with the number of tokens.

    Args:
        model: a supported model (see ``moefy.arch``); run in eval mode, then restored.
            Encoder-decoder models get each block as both encoder and decoder input.
        data: the token blocks.
        config: what to measure; ``ProfileConfig()`` when omitted.

    Returns:
        The :class:`SparsityProfile`.

    Example:
        >>> result = profile(model, blocks, ProfileConfig(batch_size=4, coactivation=True))
        >>> result.save("runs/profile")
        >>> result.table_rows()[0]["active %"]
    """
    config = config if config is not None else ProfileConfig()
    check_config(config, ProfileConfig)
    if not isinstance(data, TokenBlocks):
        raise MoefyError(f"data must be TokenBlocks (see moefy.data), got {type(data).__name__}")
    sites = find_ffns(model)
    device = _model_device(model)
    positions = pattern_positions(data.n_tokens, config.pattern_tokens)  # (S,) or None
    accumulators = [
        LayerAccumulator(site.weights().neuron_norms().to(device), config, positions)
        for site in sites
    ]
    rank, world = rank_and_world()
    shard = data.shard(rank, world)
    num_batches = -(-shard.num_blocks // config.batch_size)
    show_progress = config.progress and is_main_process()
    with (
        _recording(model, sites, accumulators) as record,
        tqdm(total=num_batches, desc="profile", unit="batch", disable=not show_progress) as bar,
    ):
        for input_ids, token_index in zip(
            shard.batches(config.batch_size),
            _token_indices(data, rank, world, config.batch_size),
            strict=True,
        ):
            record(input_ids.to(device), token_index)  # (B, T), (B*T,)
            bar.update(1)
    for accumulator in accumulators:
        accumulator.all_reduce_()
    sums = [accumulator.tensors() for accumulator in accumulators]
    coactivation = [s.pop("coactivation") for s in sums] if config.coactivation else None
    patterns = [a.pattern_tensor() for a in accumulators] if positions is not None else None
    return SparsityProfile(
        config=config,
        fingerprint=model_fingerprint(model),
        layer_names=[site.name for site in sites],
        layer_sums=sums,
        data={
            "source": data.source,
            "split": data.split,
            "n_tokens": data.n_tokens,
            "block_len": data.block_len,
        },
        coactivation=coactivation,
        patterns=patterns,
    )


def _token_indices(
    data: TokenBlocks, rank: int, world: int, batch_size: int
) -> Iterator[torch.Tensor]:
    """Yield, per batch of this rank's shard, the (B*T,) global indices of its tokens in
    ``data`` (block-major): the blocks' own indices, sharded and batched like the blocks."""
    block_ids = TokenBlocks(torch.arange(data.num_blocks)[:, None]).shard(rank, world)
    offsets = torch.arange(data.block_len)  # (T,)
    for ids in block_ids.batches(batch_size):  # (B, 1)
        yield (ids * data.block_len + offsets).view(-1)  # (B*T,)


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def forward_inputs(model: nn.Module, input_ids: torch.Tensor) -> dict[str, object]:
    """The keyword arguments for one profiling forward pass over (B, T) ``input_ids``.

    Encoder-decoder models get the blocks as decoder input too (every decoder FFN then sees
    B*T tokens); the KV cache is off and causal LMs compute the logits of one position only,
    because profiling needs neither.
    """
    kwargs: dict[str, object] = {"input_ids": input_ids}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = input_ids
    parameters = inspect.signature(model.forward).parameters
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


@contextlib.contextmanager
def _recording(
    model: nn.Module, sites: list[FFNSite], accumulators: list[LayerAccumulator]
) -> Iterator:
    """Hook every FFN; yield ``record(input_ids, token_index)``, which runs one forward pass into
    the accumulators. Hooks are removed and the training flag restored on exit, exception or
    not."""
    batch_shape: list[int] = []  # (B, T) of the batch in flight
    batch_tokens: list[torch.Tensor] = []  # [(B*T,) global token indices of the batch in flight]

    def make_hook(site: FFNSite, accumulator: LayerAccumulator):
        F = accumulator.d_ff

        def hook(module: nn.Module, args: tuple) -> None:
            h = args[0]  # (B, T, F), or (B*T, F) for OPT
            B, T = batch_shape
            if h.numel() != B * T * F:
                raise MoefyError(
                    f"{site.name}: the down projection got {tuple(h.shape)} for a batch of "
                    f"{B} blocks of {T} tokens; expected {B * T} tokens of width {F}"
                )
            accumulator.update(h.detach().reshape(B, T, F), batch_tokens[0])

        return hook

    was_training = model.training
    handles = []
    try:
        for site, accumulator in zip(sites, accumulators, strict=True):
            handles.append(
                site.output_module.register_forward_pre_hook(make_hook(site, accumulator))
            )
        model.eval()

        def record(input_ids: torch.Tensor, token_index: torch.Tensor) -> None:
            batch_shape[:] = input_ids.shape
            batch_tokens[:] = [token_index]
            with torch.inference_mode():
                model(**forward_inputs(model, input_ids))

        yield record
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
