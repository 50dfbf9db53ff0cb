"""Train one router per MoE layer to predict each expert's true output norm.

Shape legend:
    B: batch of blocks, T: block length, N: tokens, D: model width, E: experts, R: reservoir size

Collection runs the model densely over the calibration blocks once. A pre-forward hook on each
:class:`~moefy.moe.MoEFFN` (inside a context manager, so hooks go even on an exception) takes the
layer's input x, computes the true norms ``||W_out_e h_e||`` and streams both into a bounded
per-layer reservoir of ``tokens_per_layer`` tokens (reservoir sampling beyond that), so memory is
``layers x R x (D + E)`` whatever the amount of text. Each router is then fitted by regression on
log norms (MSE, Adam) over its reservoir, a held-out share of which gives the report. Under
``torch.distributed`` each rank collects its shard of the blocks and gradients are averaged over
ranks at every step; every rank ends with the same routers.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as Fn
from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.dist import all_reduce_sum_, rank_and_world
from moefy.errors import MoefyError
from moefy.moe.flops import ffn_flops_per_token
from moefy.moe.module import MoEFFN
from moefy.routing.config import RouterConfig
from moefy.routing.report import LayerRouterReport, RouterReport
from moefy.routing.routers import LOG_NORM_FLOOR, ROUTERS, Router


class _Reservoir:
    """A fixed-size uniform sample of (router input, log true norms) pairs of one layer."""

    def __init__(self, size: int, d_model: int, num_experts: int, dtype: torch.dtype, device):
        self.inputs = torch.empty(size, d_model, dtype=dtype, device=device)  # (R, D)
        self.targets = torch.empty(size, num_experts, dtype=torch.float32, device=device)  # (R, E)
        self.seen = 0

    @property
    def size(self) -> int:
        return min(self.seen, self.inputs.shape[0])

    def add(self, x: torch.Tensor, log_norms: torch.Tensor, gen: torch.Generator) -> None:
        """Add (N, D) inputs and (N, E) targets (Algorithm R, vectorised)."""
        capacity, n = self.inputs.shape[0], x.shape[0]
        free = max(0, min(n, capacity - self.seen))
        if free:
            self.inputs[self.seen : self.seen + free] = x[:free].to(self.inputs.dtype)
            self.targets[self.seen : self.seen + free] = log_norms[:free].float()
        if free < n:
            # token number i (0-based) replaces a uniform slot j in [0, i] when j < capacity
            numbers = torch.arange(self.seen + free, self.seen + n, dtype=torch.float64)
            slots = (
                torch.rand(n - free, generator=gen, dtype=torch.float64) * (numbers + 1)
            ).long()
            keep = slots < capacity
            slots, rest = slots[keep].to(x.device), torch.arange(free, n, device=x.device)[keep]
            self.inputs[slots] = x[rest].to(self.inputs.dtype)
            self.targets[slots] = log_norms[rest].float()
        self.seen += n


@contextlib.contextmanager
def _collecting(
    layers: list[MoEFFN], reservoirs: list[_Reservoir], gen: torch.Generator
) -> Iterator[None]:
    """Hooks that feed each layer's input and true expert norms into its reservoir.

    Every layer is made to run all its experts, so later layers see the dense model's inputs.
    """

    def hook(moe: MoEFFN, args: tuple, reservoir: _Reservoir) -> None:
        x = args[0].reshape(-1, moe.d_model)  # (N, D)
        log_norms = moe.expert_norms(x).float().clamp_min(LOG_NORM_FLOOR).log()  # (N, E)
        reservoir.add(x, log_norms, gen)
        moe.select_next(torch.ones(x.shape[0], moe.num_experts, dtype=torch.bool))

    handles = [
        moe.register_forward_pre_hook(lambda m, a, r=reservoir: hook(m, a, r))
        for moe, reservoir in zip(layers, reservoirs, strict=True)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _topk_metrics(
    scores: torch.Tensor, log_norms: torch.Tensor, k: int
) -> tuple[float, float, float]:
    """Sums over tokens of (recall of the true top-k, norm share of chosen, of true top-k).

    Args:
        scores: (N, E) router scores.
        log_norms: (N, E) log true norms.
        k: experts chosen per token.
    """
    norms = log_norms.exp()  # (N, E)
    chosen = scores.topk(k, dim=-1).indices  # (N, k)
    best = log_norms.topk(k, dim=-1).indices  # (N, k)
    hit = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, best, True).gather(1, chosen)
    total = norms.sum(-1).clamp_min(torch.finfo(norms.dtype).tiny)  # (N,)
    share = norms.gather(1, chosen).sum(-1) / total
    oracle_share = norms.gather(1, best).sum(-1) / total
    recall = hit.float().sum(-1) / k
    return float(recall.sum()), float(share.sum()), float(oracle_share.sum())


def _holdout_metrics(
    router: Router, inputs: torch.Tensor, log_norms: torch.Tensor, k: int, batch: int
) -> tuple[float, float, float, int]:
    """Mean (recall, norm share, oracle norm share) over all ranks' held-out tokens."""
    sums = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch):
            scores = router.scores(inputs[start : start + batch])
            metrics = _topk_metrics(scores.float(), log_norms[start : start + batch], k)
            sums += torch.tensor([*metrics, scores.shape[0]], dtype=torch.float64)
    all_reduce_sum_(sums)
    n = max(1.0, float(sums[3]))
    return float(sums[0]) / n, float(sums[1]) / n, float(sums[2]) / n, int(sums[3])


def _max_over_ranks(value: int) -> int:
    if rank_and_world()[1] <= 1:
        return value
    tensor = torch.tensor([value])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def _average_gradients(router: nn.Module, world: int) -> None:
    if world <= 1:
        return
    for param in router.parameters():
        if param.grad is not None:
            all_reduce_sum_(param.grad).div_(world)


def _fit(
    router: Router,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: RouterConfig,
    gen: torch.Generator,
) -> float:
    """Regress ``router`` on log norms; return the last epoch's mean loss (all ranks)."""
    _, world = rank_and_world()
    n_local = inputs.shape[0]
    # Start the output bias at each expert's mean log norm: training then learns the deviations.
    last = [m for m in router.modules() if isinstance(m, nn.Linear)][-1]
    stats = torch.cat(
        [targets.sum(0).double(), torch.tensor([float(n_local)], dtype=torch.float64)]
    )
    all_reduce_sum_(stats)
    with torch.no_grad():
        last.bias.copy_((stats[:-1] / max(1.0, float(stats[-1]))).to(last.bias.dtype))
    steps = _max_over_ranks(math.ceil(n_local / config.batch_size))
    optimizer = torch.optim.Adam(
        router.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps * config.epochs)
    epoch_loss = torch.zeros(2, dtype=torch.float64)
    router.train()
    for _ in range(config.epochs):
        order = torch.randperm(max(1, n_local), generator=gen)
        epoch_loss.zero_()
        for step in range(steps):
            # ranks with fewer tokens wrap around so every rank takes the same number of steps
            index = order[
                (step * config.batch_size + torch.arange(config.batch_size)) % max(1, n_local)
            ]
            x, y = inputs[index.to(inputs.device)], targets[index.to(targets.device)]
            loss = Fn.mse_loss(router.predict_log_norms(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(router, world)
            optimizer.step()
            schedule.step()
            epoch_loss += torch.tensor([float(loss.detach()), 1.0], dtype=torch.float64)
    router.eval()
    all_reduce_sum_(epoch_loss)
    return float(epoch_loss[0] / epoch_loss[1].clamp_min(1))


def train_routers(
    model: nn.Module,
    data: TokenBlocks,
    config: RouterConfig | None = None,
    *,
    progress: bool = False,
) -> RouterReport:
    """Give every MoE layer a router fitted to predict its experts' true output norms.

    Each layer keeps its top-k setting (``k`` / ``fraction``); the new routers replace the
    layers' selectors, so :func:`moefy.moe.save` writes them with the model.

    Args:
        model: a moefied model (see :func:`moefy.moe.moefy_`).
        data: calibration blocks, e.g. ``load_text("bbc-news").blocks(tokenizer, n_tokens=16384)``.
        config: the :class:`RouterConfig` (default: an ``mlp`` router).
        progress: show progress bars (rank 0 only).

    Returns:
        A :class:`RouterReport` with per-layer recall, norm share and router cost, measured on a
        held-out share of the calibration tokens.

    Raises:
        MoefyError: the model has no MoE layers.

    Example:
        >>> report = train_routers(model, blocks, RouterConfig(router="mlp"))
        >>> set_routing(model, fraction=0.25)
    """
    from tqdm.auto import tqdm

    from moefy.moe.convert import moe_layers, reset_tally

    config = config or RouterConfig()
    layers = moe_layers(model)
    if not layers:
        raise MoefyError("the model has no MoE layers; call moefy_ first")
    started = time.perf_counter()
    rank, world = rank_and_world()
    show = progress and rank == 0
    gen = torch.Generator().manual_seed(config.seed + rank)
    shard = data.shard(rank, world)
    device = layers[0].w_in.device
    storage = getattr(torch, config.storage_dtype)
    reservoirs = [
        _Reservoir(config.tokens_per_layer, m.d_model, m.num_experts, storage, device)
        for m in layers
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _collecting(layers, reservoirs, gen):
            batches = tqdm(
                shard.batches(config.forward_batch_size) if shard.num_blocks else [],
                total=math.ceil(shard.num_blocks / config.forward_batch_size),
                desc="collecting router data",
                unit="batch",
                disable=not show,
            )
            for input_ids in batches:
                model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        model.train(was_training)
    reset_tally(model)

    torch.manual_seed(config.seed)  # the same initial routers on every rank
    reports = []
    for moe, reservoir in tqdm(
        list(zip(layers, reservoirs, strict=True)), desc="training routers", disable=not show
    ):
        old = moe.selector
        router = ROUTERS[config.router].for_layer(
            moe, k=old.k, fraction=old.fraction, **ROUTERS[config.router].config_settings(config)
        )
        n = reservoir.size
        n_holdout = max(1, math.floor(n * config.holdout_fraction)) if n > 1 else 0
        inputs, targets = reservoir.inputs[:n], reservoir.targets[:n]
        train_x, train_y = inputs[: n - n_holdout], targets[: n - n_holdout]
        held_x, held_y = inputs[n - n_holdout :], targets[n - n_holdout :]
        k = min(moe.num_experts, max(1, round(config.report_fraction * moe.num_experts)))
        untrained, _, _, _ = _holdout_metrics(router, held_x, held_y, k, config.batch_size * 8)
        loss = float("nan")
        if router.trainable:
            loss = _fit(router, train_x, train_y, config, gen)
        recall, share, oracle_share, n_held = _holdout_metrics(
            router, held_x, held_y, k, config.batch_size * 8
        )
        moe.selector = router
        expert_flops = ffn_flops_per_token(
            moe.d_model,
            k * moe.expert_size,
            gated=moe.gated,
            in_biases=moe._in_biases(),
            out_bias=moe.b_out is not None,
        )
        n_train = int(all_reduce_sum_(torch.tensor([train_x.shape[0]]))[0])
        reports.append(
            LayerRouterReport(
                layer=moe.layer_index,
                experts_selected=k,
                recall=recall,
                untrained_recall=untrained,
                random_recall=k / moe.num_experts,
                norm_share=share,
                oracle_norm_share=oracle_share,
                router_flops=router.flops_per_token(moe.d_model),
                saved_flops=moe.dense_flops_per_token() - expert_flops,
                final_loss=loss,
                n_train=n_train,
                n_holdout=n_held,
            )
        )
    n_tokens = int(all_reduce_sum_(torch.tensor([reservoirs[0].seen]))[0])
    return RouterReport(
        router=config.router,
        config=config.to_dict(),
        layers=reports,
        n_tokens=n_tokens,
        seconds=time.perf_counter() - started,
    )
