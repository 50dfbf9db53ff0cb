"""Train one router per MoE layer to predict which experts carry each token's output norm.

Shape legend:
    B: batch of blocks, T: block length, N: tokens, D: model width, E: experts, R: reservoir size

Collection runs the decoder (no LM head) densely over the calibration blocks once. A
pre-forward hook on each :class:`~moefy.moe.MoEFFN` (inside a context manager, so hooks go even
on an exception) takes the layer's input x, computes the true norms ``||W_out_e h_e||`` and
streams both into a bounded per-layer reservoir (reservoir sampling beyond
``tokens_per_layer``), so memory is ``layers x R x (D + E)`` whatever the amount of text. Each
router is then fitted with a loss of :data:`ROUTER_LOSSES` (default ``listwise``: the predicted
share of each expert in the token's total norm against the true share), or, for a closed-form
router (:mod:`moefy.routing.closed_form`), fitted in one step to the true norms; the last
``holdout_fraction`` of the text gives the report.

Targets are computed and stored in float32 whatever the model dtype. Seeded draws (reservoir slots,
shuffles) come from CPU generators, so a run gives the same sample on every device; only the
drawn indices travel to the model's device.

Under ``torch.distributed`` each rank collects its shard of the blocks; the samples of layer i
are gathered on rank ``i % world``, which trains that layer alone, and the routers are then
broadcast. Layers train in parallel, and every rank ends with the routers (and report) that
one process would give on the same blocks (exactly, when each block runs in its own forward
pass and the text fits in ``tokens_per_layer``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from moefy.data.blocks import TokenBlocks
from moefy.dist import all_reduce_sum_, broadcast_, rank_and_world
from moefy.errors import MoefyError, check_config
from moefy.moe.flops import ffn_flops_per_token
from moefy.moe.module import MoEFFN
from moefy.routing.config import RouterConfig
from moefy.routing.losses import ROUTER_LOSSES
from moefy.routing.report import LayerRouterReport, RouterReport
from moefy.routing.routers import LOG_NORM_FLOOR, ROUTERS, Router

__all__ = ["ROUTER_LOSSES", "train_routers"]


# Layer i's router is initialised and shuffled from seed * _SEED_STRIDE + i, so it does not
# depend on which rank trains it or on the layers trained before it.
_SEED_STRIDE = 1_000_003


class _Reservoir:
    """A fixed-size uniform sample of (router input, log true norms, position) of one layer.

    ``positions`` are the tokens' places in the whole calibration text (block * T + t), so the
    samples of all ranks can be put back in the order one process would have collected them.
    """

    def __init__(self, size: int, d_model: int, num_experts: int, dtype: torch.dtype, device):
        self.inputs = torch.empty(size, d_model, dtype=dtype, device=device)  # (R, D)
        self.targets = torch.empty(size, num_experts, dtype=torch.float32, device=device)  # (R, E)
        self.positions = torch.empty(size, dtype=torch.long, device=device)  # (R,)
        self.seen = 0

    @property
    def size(self) -> int:
        return min(self.seen, self.inputs.shape[0])

    def add(
        self,
        x: torch.Tensor,
        log_norms: torch.Tensor,
        gen: torch.Generator,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Add (N, D) inputs, (N, E) targets and (N,) positions (Algorithm R, vectorised)."""
        capacity, n = self.inputs.shape[0], x.shape[0]
        if positions is None:
            positions = torch.arange(self.seen, self.seen + n, device=self.positions.device)
        positions = positions.to(self.positions.device)  # no copy when already there
        free = max(0, min(n, capacity - self.seen))
        if free:
            self.inputs[self.seen : self.seen + free] = x[:free].to(self.inputs.dtype)
            self.targets[self.seen : self.seen + free] = log_norms[:free].float()
            self.positions[self.seen : self.seen + free] = positions[:free]
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
            self.positions[slots] = positions[rest.to(positions.device)]
        self.seen += n


class _Collector:
    """Hooks that feed each layer's input and true expert norms into its reservoir.

    Set :attr:`positions` to the (B*T,) places of the next batch's tokens before each forward.
    With ``dense`` every layer runs all its experts, so later layers see the dense model's
    inputs; otherwise each layer's own selector runs (inputs of the routed model).
    """

    def __init__(
        self,
        layers: list[MoEFFN],
        reservoirs: list[_Reservoir],
        gen: torch.Generator,
        *,
        dense: bool = True,
    ):
        self.layers, self.reservoirs, self.gen, self.dense = layers, reservoirs, gen, dense
        self.positions: torch.Tensor | None = None

    def _hook(self, moe: MoEFFN, args: tuple, reservoir: _Reservoir) -> None:
        x = args[0].reshape(-1, moe.d_model)  # (N, D)
        # the targets in float32 even for a bf16 / fp16 model
        norms = moe.expert_norms(x, dtype=torch.float32)  # (N, E)
        log_norms = norms.clamp_min(LOG_NORM_FLOOR).log()
        reservoir.add(x, log_norms, self.gen, self.positions)
        if self.dense:
            every = torch.ones(x.shape[0], moe.num_experts, dtype=torch.bool, device=x.device)
            moe.select_next(every)

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        handles = [
            moe.register_forward_pre_hook(lambda m, a, r=reservoir: self._hook(m, a, r))
            for moe, reservoir in zip(self.layers, self.reservoirs, strict=True)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _collect(
    model: nn.Module,
    data: TokenBlocks,
    layers: list[MoEFFN],
    config: RouterConfig,
    *,
    dense: bool,
    show: bool,
    desc: str,
) -> list[_Reservoir]:
    """Run this rank's shard of ``data`` through ``model``; one reservoir per layer.

    Each rank keeps its share of ``tokens_per_layer`` (in proportion to its tokens), so the
    ranks' samples together hold at most ``tokens_per_layer`` tokens, and all of them when the
    text is no longer than that.
    """
    from tqdm.auto import tqdm

    rank, world = rank_and_world()
    shard = data.shard(rank, world)
    block_len = data.input_ids.shape[1]
    capacity = max(
        1, math.ceil(config.tokens_per_layer * shard.num_blocks / max(1, data.num_blocks))
    )
    device = layers[0].w_in.device
    storage = getattr(torch, config.storage_dtype)
    reservoirs = [_Reservoir(capacity, m.d_model, m.num_experts, storage, device) for m in layers]
    collector = _Collector(
        layers, reservoirs, torch.Generator().manual_seed(config.seed + rank), dense=dense
    )
    # The decoder without the LM head: collection needs no logits.
    trunk = getattr(model, "base_model", model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), collector.hooked():
            batches = tqdm(
                shard.batches(config.forward_batch_size) if shard.num_blocks else [],
                total=math.ceil(shard.num_blocks / config.forward_batch_size),
                desc=desc,
                unit="batch",
                disable=not show,
            )
            done = 0
            offsets = torch.arange(block_len, device=device)  # (T,)
            for input_ids in batches:
                # local block j of rank r is block r + j * world of the whole text
                blocks = rank + world * torch.arange(
                    done, done + input_ids.shape[0], device=device
                )  # (B,)
                collector.positions = (blocks.unsqueeze(1) * block_len + offsets).reshape(
                    -1
                )  # (B*T,)
                trunk(input_ids=input_ids.to(device), use_cache=False)
                done += input_ids.shape[0]
    finally:
        model.train(was_training)
    return reservoirs


def _gather_to(
    reservoir: _Reservoir, owner: int, capacity: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """All ranks' samples of one layer, on rank ``owner``, in calibration-text order.

    Returns (inputs (n, D), targets (n, E)) on the owner, None elsewhere; more than
    ``capacity`` tokens are cut to a seeded uniform subset.
    """
    rank, world = rank_and_world()
    n = reservoir.size
    inputs, targets, positions = (
        reservoir.inputs[:n],
        reservoir.targets[:n],
        reservoir.positions[:n],
    )
    if world > 1:
        sizes = torch.zeros(world, dtype=torch.long)
        sizes[rank] = n
        all_reduce_sum_(sizes)
        most = int(sizes.max())
        parts = []
        for tensor in (inputs, targets, positions):
            # gloo has no bfloat16; float32 holds it exactly
            wire = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
            padded = wire.new_zeros((most, *wire.shape[1:]))
            padded[:n] = wire
            received = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
            dist.gather(padded, received, dst=owner)
            if rank == owner:
                joined = torch.cat([r[: int(k)] for r, k in zip(received, sizes, strict=True)])
                parts.append(joined.to(tensor.dtype))
        if rank != owner:
            return None
        inputs, targets, positions = parts
    order = positions.argsort()
    if order.shape[0] > capacity:
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(order.shape[0], generator=gen)[:capacity].sort().values
        order = order[keep]
    return inputs[order], targets[order]


def _topk_metrics(scores: torch.Tensor, log_norms: torch.Tensor, k: int) -> torch.Tensor:
    """(3,) float64 sums over tokens of (recall of the true top-k, norm share of chosen, of true
    top-k), on the device of ``scores`` (no host sync per batch).

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
    return torch.stack([recall.sum(), share.sum(), oracle_share.sum()]).double()


def _holdout_metrics(
    router: Router,
    moe: MoEFFN,
    inputs: torch.Tensor,
    log_norms: torch.Tensor,
    k: int,
    batch: int,
) -> tuple[float, float, float]:
    """Mean (recall, norm share, oracle norm share) over held-out tokens of ``moe``; its shared
    experts (which always run) count as chosen."""
    sums = torch.zeros(3, dtype=torch.float64, device=inputs.device)
    shared = int(getattr(moe, "num_shared", 0))
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch):
            scores = router.scores(inputs[start : start + batch], moe).float()  # (n, E)
            scores[:, :shared] = float("inf")
            sums += _topk_metrics(scores, log_norms[start : start + batch], k)
    n = max(1, inputs.shape[0])
    recall, share, oracle_share = (sums / n).tolist()  # the final figures, to the host once
    return recall, share, oracle_share


def _fit(
    router: Router,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: RouterConfig,
    gen: torch.Generator,
) -> float:
    """Fit ``router`` to the true log norms with the config's loss; last epoch's mean loss."""
    n = inputs.shape[0]
    if n == 0:
        return float("nan")
    loss_fn = ROUTER_LOSSES[config.loss]
    # Start the output bias at each expert's mean log norm: training then learns the deviations.
    last = [m for m in router.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias.copy_(targets.mean(0).to(last.bias.dtype))
    steps = math.ceil(n / config.batch_size)
    optimizer = torch.optim.Adam(
        router.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps * config.epochs)
    epoch_loss = torch.zeros((), dtype=torch.float64, device=inputs.device)
    router.train()
    for _ in range(config.epochs):
        # drawn on the CPU (the same order on every device), moved once per epoch
        order = torch.randperm(n, generator=gen).to(inputs.device)
        epoch_loss.zero_()
        for step in range(steps):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            x, y = inputs[index], targets[index]
            loss = loss_fn(router.predict_log_norms(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += loss.detach()  # summed on the device: no host sync per step
    optimizer.zero_grad(set_to_none=True)  # leave no stale gradients on the model
    router.eval()
    return float(epoch_loss) / steps


def _fit_layer(
    router: Router,
    moe: MoEFFN,
    inputs: torch.Tensor,
    log_norms: torch.Tensor,
    config: RouterConfig,
    index: int,
) -> float:
    """Train or fit layer ``index``'s router on its (N, D) inputs and (N, E) log true norms;
    the last epoch's mean loss (nan when nothing is trained)."""
    if router.closed_form:
        if inputs.shape[0]:
            with torch.no_grad():
                router.fit(inputs, log_norms.exp(), moe)
        return float("nan")
    if not router.trainable:
        return float("nan")
    gen = torch.Generator().manual_seed(config.seed * _SEED_STRIDE + index)
    return _fit(router, inputs, log_norms, config, gen)


@contextlib.contextmanager
def _routed_by(layers: list[MoEFFN], routers: list[Router], keep: float) -> Iterator[None]:
    """Each layer runs its router at the share ``keep`` of experts for the block; then its own
    selector and the routers' settings come back."""
    saved = [(moe.selector, r.k, r.fraction) for moe, r in zip(layers, routers, strict=True)]
    try:
        for moe, router in zip(layers, routers, strict=True):
            router.set_topk(fraction=keep)
            moe.selector = router
        yield
    finally:
        for moe, router, (selector, k, share) in zip(layers, routers, saved, strict=True):
            moe.selector = selector
            router.set_topk(k=k, fraction=share)


def _fit_round(
    layers: list[MoEFFN],
    routers: list[Router],
    reservoirs: list[_Reservoir | None],
    figures: list[torch.Tensor],
    config: RouterConfig,
    *,
    show: bool,
    untrained: bool,
) -> None:
    """Train every router on its layer's reservoir (continuing from its current weights) and
    write its figures (the recall before training only when ``untrained``; otherwise the figure
    keeps the one it has); under torchrun layer i is trained by rank i % world and then
    broadcast."""
    from tqdm.auto import tqdm

    _, world = rank_and_world()
    # Layer i is trained by rank i % world on every rank's samples of it; gather them all first
    # so that no rank waits for another's training.
    owned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i in range(len(layers)):
        gathered = _gather_to(
            reservoirs[i], i % world, config.tokens_per_layer, config.seed * _SEED_STRIDE + i
        )
        reservoirs[i] = None  # free this layer's share as soon as it has been sent
        if gathered is not None:
            owned[i] = gathered
    for i in tqdm(sorted(owned), desc="training routers", disable=not show):
        moe, router = layers[i], routers[i]
        inputs, targets = owned.pop(i)
        n = inputs.shape[0]
        n_holdout = max(1, math.floor(n * config.holdout_fraction)) if n > 1 else 0
        # the held-out tokens are the last of the text: other documents than the trained ones
        train_x, train_y = inputs[: n - n_holdout], targets[: n - n_holdout]
        held_x, held_y = inputs[n - n_holdout :], targets[n - n_holdout :]
        k, batch = _report_k(moe, config), config.batch_size * 8
        before = float(figures[i][0])
        if untrained and not router.closed_form:  # an unfitted closed-form router scores nothing
            before, _, _ = _holdout_metrics(router, moe, held_x, held_y, k, batch)
        loss = _fit_layer(router, moe, train_x, train_y, config, i)
        recall, share, oracle_share = _holdout_metrics(router, moe, held_x, held_y, k, batch)
        figures[i] = torch.tensor(
            [before, recall, share, oracle_share, loss, train_x.shape[0], n_holdout],
            dtype=torch.float64,
        )
    if world > 1:  # every rank ends with every router and figure, from the rank that made it
        for i, (router, figure) in enumerate(zip(routers, figures, strict=True)):
            with torch.no_grad():
                for tensor in router.state_dict().values():
                    dist.broadcast(tensor, src=i % world)
            broadcast_(figure, src=i % world)


def train_routers(
    model: nn.Module,
    data: TokenBlocks,
    config: RouterConfig | None = None,
    *,
    progress: bool = False,
) -> RouterReport:
    """Give every MoE layer a router fitted to predict its experts' true output norms.

    Each layer keeps its top-k setting (``k`` / ``keep``); the new routers replace the
    layers' selectors, so :func:`moefy.moe.save` writes them with the model.

    Closed-form routers (``analytic``, ``lstsq``) are fitted once to the dense model's inputs
    and true norms, with no gradient steps.

    The first round learns from the dense model's inputs. With ``config.rounds`` > 1 each later
    round runs the text through the model routed by the last round's routers (keeping
    ``config.report_fraction`` of experts) and trains them further on the inputs each layer then
    sees: later layers meet the routed model's hidden states at inference, not the dense ones.

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
        >>> set_routing(model, keep=0.25)
    """
    from moefy.moe.convert import moe_layers

    config = RouterConfig() if config is None else config
    check_config(config, RouterConfig)
    layers = moe_layers(model)
    if not layers:
        raise MoefyError("the model has no MoE layers; call moefy_ first")
    started = time.perf_counter()
    show = progress and rank_and_world()[0] == 0
    routers = _new_routers(layers, config)
    figures, n_tokens = _train_rounds(model, data, layers, routers, config, show=show)
    reports = []
    for moe, router, figure in zip(layers, routers, figures, strict=True):
        moe.selector = router
        reports.append(_layer_report(moe, router, figure, config))
    return RouterReport(
        router=config.router,
        config=config.to_dict(),
        layers=reports,
        n_tokens=n_tokens,
        seconds=time.perf_counter() - started,
    )


def _new_routers(layers: list[MoEFFN], config: RouterConfig) -> list[Router]:
    """One untrained router per layer with the layer's top-k setting; layer i's weights come
    from seed ``seed * _SEED_STRIDE + i``, the same on every rank."""
    router_class = ROUTERS.get(config.router).value
    routers = []
    for i, moe in enumerate(layers):
        old = moe.selector
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed * _SEED_STRIDE + i)
            routers.append(
                router_class.for_layer(
                    moe, k=old.k, fraction=old.fraction, **router_class.config_settings(config)
                )
            )
    return routers


def _train_rounds(
    model: nn.Module,
    data: TokenBlocks,
    layers: list[MoEFFN],
    routers: list[Router],
    config: RouterConfig,
    *,
    show: bool,
) -> tuple[list[torch.Tensor], int]:
    """Collect and train ``config.rounds`` times (closed-form routers: collect and fit once);
    each layer's (7,) figures and the number of calibration tokens seen (over all ranks)."""
    from moefy.moe.convert import reset_tally

    # untrained recall, recall, norm share, oracle share, loss, train and held-out tokens
    figures = [torch.full((7,), float("nan"), dtype=torch.float64) for _ in layers]
    n_tokens = 0
    # a closed-form fit is the same whatever the round: fitted once, on the dense model's inputs
    rounds = 1 if routers and routers[0].closed_form else config.rounds
    for round_index in range(rounds):
        if round_index == 0:  # the dense model's inputs
            reservoirs = _collect(
                model, data, layers, config, dense=True, show=show, desc="collecting router data"
            )
            n_tokens = int(all_reduce_sum_(torch.tensor([reservoirs[0].seen]))[0])
        else:  # the inputs of the model routed by the last round's routers
            with _routed_by(layers, routers, config.report_fraction):
                reservoirs = _collect(
                    model,
                    data,
                    layers,
                    config,
                    dense=False,
                    show=show,
                    desc=f"collecting routed inputs (round {round_index + 1})",
                )
        reset_tally(model)
        # the report's "untrained" recall is the first round's, before any training
        _fit_round(
            layers, routers, reservoirs, figures, config, show=show, untrained=round_index == 0
        )
    return figures, n_tokens


def _layer_report(
    moe: MoEFFN, router: Router, figure: torch.Tensor, config: RouterConfig
) -> LayerRouterReport:
    """One layer's line of the report from its (7,) figures."""
    k = _report_k(moe, config)
    untrained, recall, share, oracle_share, loss, n_train, n_holdout = figure.tolist()
    expert_flops = ffn_flops_per_token(
        moe.d_model,
        k * moe.expert_size,
        gated=moe.gated,
        in_biases=moe._in_biases(),
        out_bias=moe.b_out is not None,
    )
    return LayerRouterReport(
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
        n_train=int(n_train),
        n_holdout=int(n_holdout),
    )


def _report_k(moe: MoEFFN, config: RouterConfig) -> int:
    """Experts per token the report's recall and norm share are measured at."""
    return min(moe.num_experts, max(1, round(config.report_fraction * moe.num_experts)))
