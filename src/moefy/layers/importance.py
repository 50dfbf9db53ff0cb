"""How redundant each block, attention sublayer and MLP is: LLM-Drop's similarity, and optionally
the perplexity with that one part removed.

Similarity (LLM-Drop, "What Matters in Transformers?"): for a part P with residual stream X before
it and Y = X + P(...) after it, the cosine similarity cos(X, Y) per token, averaged over all
tokens. Close to 1: the part barely changes the stream, so it is redundant. Hooks read, per block,

    X      the block input (forward pre-hook on the block),
    A      what attention adds to the stream (forward hook on the attention, or on Gemma 2's
           post-attention norm),
    Y      the block output (forward hook on the block),

and score attention as cos(X, X + A), the MLP as cos(X + A, Y) and the block as cos(X, Y). For
parallel-residual blocks (GPT-NeoX) this treats the MLP as if it came after attention; post-norm
blocks (OPT-350m style) are measured on the stream before their norm. Sums stream into float64
accumulators of fixed size (three sums per block); no per-token lists are kept.

Shape legend:
    B: batch of blocks, T: block length, D: model width, L: number of blocks
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moefy.arch import model_type_of
from moefy.arch.spec import get_submodule
from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError, check_config
from moefy.layers.config import LayerImportanceConfig
from moefy.layers.drop import drop_layers_, dropped_layers, restore_layers
from moefy.layers.result import LayerImportance, LayerScores
from moefy.layers.sites import ATTENTION, BLOCK, MLP, PARTS, LayerSite, find_layers

_DROP_ARGUMENT = {ATTENTION: "attention", MLP: "mlp", BLOCK: "blocks"}


class _SimilaritySums:
    """Per block: the summed cosine similarities of attention, MLP and block, and the tokens.

    The sums are float64 on the model's device (no host sync per layer and batch).
    """

    def __init__(self, num_blocks: int, device: torch.device | None = None) -> None:
        self.sums = torch.zeros(num_blocks, len(PARTS), dtype=torch.float64, device=device)
        self.tokens = torch.zeros(num_blocks, dtype=torch.float64, device=device)  # (L,)

    def add(self, index: int, x: torch.Tensor, added: torch.Tensor | None, y: torch.Tensor):
        """Add one batch: block input x, attention's addition (None: nothing), output y."""
        x, y = x.float(), y.float()  # (B, T, D)
        mid = x if added is None else x + added.float().reshape(x.shape)
        cos = torch.stack(
            [
                F.cosine_similarity(x, mid, dim=-1),
                F.cosine_similarity(mid, y, dim=-1),
                F.cosine_similarity(x, y, dim=-1),
            ]
        )  # (3, B, T)
        self.sums[index] += cos.double().flatten(1).sum(dim=1)
        self.tokens[index] += cos[0].numel()

    def means(self) -> torch.Tensor:
        """(L, 3) mean similarity per block and part (attention, MLP, block), on the CPU."""
        return (self.sums / self.tokens.clamp(min=1).unsqueeze(1)).cpu()


def _first_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@contextlib.contextmanager
def _similarity_hooks(sites: list[LayerSite], sums: _SimilaritySums) -> Iterator[None]:
    """Hook every block; the hooks are removed on exit, exception or not."""
    inputs: dict[int, torch.Tensor] = {}  # the batch in flight only
    added: dict[int, torch.Tensor] = {}
    handles = []

    def block_input(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            inputs[index] = hidden.detach()
            added.pop(index, None)

        return hook

    def attention_output(index: int):
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                added[index] = tensor.detach()

        return hook

    def block_output(index: int):
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            y = _first_tensor(output)
            x = inputs.pop(index, None)
            if x is not None and y is not None:
                sums.add(index, x, added.pop(index, None), y.detach())

        return hook

    try:
        for site in sites:
            block = site.block
            handles.append(
                block.register_forward_pre_hook(block_input(site.index), with_kwargs=True)
            )
            handles.append(block.register_forward_hook(block_output(site.index)))
            inner = site.inner_block
            if inner is not None and not getattr(block, "moefy_dropped", False):
                contribution = get_submodule(inner, site.attention_out_path)
                handles.append(contribution.register_forward_hook(attention_output(site.index)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _similarities(
    model: nn.Module, sites: list[LayerSite], data: TokenBlocks, batch_size: int, progress: bool
) -> torch.Tensor:
    from tqdm.auto import tqdm

    from moefy.profiling.profiler import forward_inputs

    device = next(model.parameters()).device
    sums = _SimilaritySums(len(sites), device)
    batches = tqdm(
        data.batches(batch_size),
        total=-(-data.num_blocks // batch_size),
        desc="layer similarity",
        unit="batch",
        disable=not progress,
    )
    with _similarity_hooks(sites, sums), torch.no_grad():
        for input_ids in batches:
            model(**forward_inputs(model, input_ids.to(device)))  # (B, T) tokens
    return sums.means()


def _removal_perplexities(
    model: nn.Module,
    num_blocks: int,
    data: TokenBlocks,
    batch_size: int,
    progress: bool,
) -> tuple[float, dict[str, list[float | None]]]:
    """Dense perplexity, and the perplexity with each part of each block removed alone."""
    from tqdm.auto import tqdm

    from moefy.eval.perplexity import perplexity

    already = dropped_layers(model)
    if not already.is_empty and not already.keep_weights:
        raise MoefyError(
            "perplexity per removed part drops and restores each part, but this model's dropped "
            "layers freed their weights (keep_weights=False): measure similarities only"
        )
    dense = perplexity(model, data, batch_size).perplexity
    result: dict[str, list[float | None]] = {part: [None] * num_blocks for part in PARTS}
    jobs = [(part, i) for i in range(num_blocks) for part in PARTS]
    for part, index in tqdm(jobs, desc="perplexity per removed part", disable=not progress):
        if index in getattr(already, _DROP_ARGUMENT[part]):
            result[part][index] = dense  # removed already: removing it again changes nothing
            continue
        try:
            drop_layers_(model, **{_DROP_ARGUMENT[part]: [index]})
        except MoefyError:
            continue  # the last attention layer or block: removing it alone is not allowed
        try:
            result[part][index] = perplexity(model, data, batch_size).perplexity
        finally:
            restore_layers(model, **{_DROP_ARGUMENT[part]: [index]})
    return dense, result


def layer_importance(
    model: nn.Module,
    data: TokenBlocks,
    config: LayerImportanceConfig | None = None,
    *,
    eval_data: TokenBlocks | None = None,
    progress: bool = False,
) -> LayerImportance:
    """Score every block, attention sublayer and MLP of a decoder by how little it changes the
    residual stream (LLM-Drop's similarity), and optionally by the perplexity without it.

    Args:
        model: a supported decoder (any model :func:`moefy.layers.find_layers` accepts); parts
            dropped already score a similarity of 1.
        data: calibration token blocks for the similarities.
        config: batch size and whether to measure perplexities (default: similarities only).
        eval_data: token blocks for the perplexities (default ``data``).
        progress: show progress bars.

    Returns:
        A :class:`LayerImportance` with one row per block.

    Raises:
        MoefyError: an unsupported model; ``config.perplexity`` on a model with no LM head.

    Example:
        >>> blocks = load_text("bbc-news").blocks(tokenizer, n_tokens=8192)
        >>> importance = layer_importance(model, blocks)
        >>> importance.most_redundant("attention", 4)
        [27, 25, 22, 26]
    """
    config = LayerImportanceConfig() if config is None else config
    check_config(config, LayerImportanceConfig)
    sites = find_layers(model)
    was_training = model.training
    model.eval()
    try:
        means = _similarities(model, sites, data, config.batch_size, progress)  # (L, 3)
        dense_ppl, removed = None, None
        if config.perplexity:
            dense_ppl, removed = _removal_perplexities(
                model,
                len(sites),
                data if eval_data is None else eval_data,
                config.batch_size,
                progress,
            )
    finally:
        model.train(was_training)
    rows = []
    for site in sites:
        similarity = means[site.index].tolist()
        rows.append(
            LayerScores(
                index=site.index,
                name=site.name,
                attention_similarity=similarity[0],
                mlp_similarity=similarity[1],
                block_similarity=similarity[2],
                attention_perplexity=removed[ATTENTION][site.index] if removed else None,
                mlp_perplexity=removed[MLP][site.index] if removed else None,
                block_perplexity=removed[BLOCK][site.index] if removed else None,
            )
        )
    return LayerImportance(
        layers=tuple(rows),
        n_tokens=data.n_tokens,
        dense_perplexity=dense_ppl,
        model_type=model_type_of(model),
        config=config,
    )
