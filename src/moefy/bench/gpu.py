"""Kernel-level GPU benchmark: the Triton kernels against cuBLAS dense, timed in the same run.

Shape legend:
    N: tokens (batch), I: input features, O: output features, D: model width, F: FFN width,
    E: experts, S: slots per expert (F / E)

What it measures: Llama-3-8B and -70B weight shapes at batch 1, 4
and 16, a threshold-sparse linear (TEAL layout) at 0 / 25 / 40 / 50 / 65 / 80 / 90 % sparsity
against ``F.linear`` on the same weights, and the Llama-3-8B MLP block against the dense gated MLP
two ways: as 64 expert blocks at the same shares of unselected experts (``experts``), and with
TEAL thresholds on its input and on its intermediate activation (``teal``: the fused gate+up
kernel, then the threshold down projection). For fairness and repeatability:

- weights are rotated among enough copies that one pass over them spans several L2 caches, so
  every call reads its weights from device memory, as a real model's layers do;
- every variant of one shape and batch is captured in its own CUDA graph of ``calls_per_graph``
  calls (launch gaps out of the numbers) and the graphs are replayed round-robin, timed with CUDA
  events; each figure is the median over rounds;
- the limit beside every figure is the bytes the variant must move (the weight rows its tokens
  keep, together, plus inputs and outputs) over the copy bandwidth measured in the same run.

The results have the layout of :func:`moefy.bench.run.run_bench` (``ffn`` rows with the same
keys, ``threads`` 0), so :func:`moefy.bench.report.cpu_report` reports them too.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as Fn

from moefy.bench.report import Report, Table
from moefy.device import DTYPES
from moefy.errors import MoefyError
from moefy.jsonconfig import JsonConfig

GPU_BENCH_VERSION = 1
BATCHES = (1, 4, 16)
# the GPU goals' levels, plus 0.75: the expert blocks at 25 % of experts
SPARSITIES = (0.0, 0.25, 0.40, 0.50, 0.65, 0.75, 0.80, 0.90)
# Weight copies span this many L2 caches, so a rotation never hits in L2.
L2_MULTIPLE = 4
COPY_BUFFER_BYTES = 2**30  # per side of the bandwidth copy: far past any L2
MLP_EXPERTS = 64
ACT = "silu"
WEIGHT_SCALE = 0.02
NO_THREADS = 0  # GPU rows: the host thread count does not apply


@dataclass(frozen=True)
class WeightShape:
    """One projection: y (N, O) = x (N, I) @ W^T, W stored (O, I) dense and (I, O) for TEAL."""

    name: str
    n_in: int
    n_out: int

    def weight_bytes(self, element_bytes: int) -> int:
        return self.n_in * self.n_out * element_bytes


LINEAR_SHAPES = (
    WeightShape("llama3-8b up 4096->14336", 4096, 14336),
    WeightShape("llama3-8b down 14336->4096", 14336, 4096),
    WeightShape("llama3-8b q/o 4096->4096", 4096, 4096),
    WeightShape("llama3-70b up 8192->28672", 8192, 28672),
    WeightShape("llama3-70b down 28672->8192", 28672, 8192),
)


@dataclass(frozen=True)
class MLPShape:
    """A gated (SiLU) MLP split into ``num_experts`` contiguous expert blocks."""

    name: str
    d_model: int
    d_ff: int
    num_experts: int = MLP_EXPERTS

    @property
    def expert_size(self) -> int:
        return math.ceil(self.d_ff / self.num_experts)

    def dense_bytes(self, element_bytes: int) -> int:
        return 3 * self.d_model * self.d_ff * element_bytes

    def expert_bytes(self, element_bytes: int) -> int:
        return 3 * self.expert_size * self.d_model * element_bytes


MLP_SHAPES = (MLPShape("llama3-8b mlp 4096x14336", 4096, 14336),)


@dataclass(frozen=True)
class GpuBenchConfig(JsonConfig):
    """What the GPU kernel benchmark measures.

    Attributes:
        batches: token counts (1..16).
        sparsities: shares of dropped inputs (TEAL) or unselected experts, each in [0, 1).
        dtype: weight and activation dtype: ``bf16``, ``fp16`` or ``fp32``.
        rounds: timed replays per variant (median over them); default 50, quick 10.
        calls_per_graph: kernel calls captured in one CUDA graph (time per call = replay / this).
        linear: time the threshold linear on :data:`LINEAR_SHAPES`.
        mlp: time the MLP block (expert blocks and TEAL thresholds) on :data:`MLP_SHAPES`.
        quick: fewer rounds.
        seed: of weights, tokens and selections.
        version: config format version.

    Example:
        >>> GpuBenchConfig(batches=(1,), quick=True).rounds_or_default()
        10
    """

    batches: tuple[int, ...] = BATCHES
    sparsities: tuple[float, ...] = SPARSITIES
    dtype: str = "bf16"
    rounds: int | None = None
    calls_per_graph: int = 20
    linear: bool = True
    mlp: bool = True
    quick: bool = False
    seed: int = 0
    version: int = GPU_BENCH_VERSION

    VERSION: ClassVar[int] = GPU_BENCH_VERSION

    def __post_init__(self) -> None:
        from moefy.kernels import SMALL_BATCH_MAX

        if not self.batches or any(not 1 <= b <= SMALL_BATCH_MAX for b in self.batches):
            raise MoefyError(f"batches must be in 1..{SMALL_BATCH_MAX}, got {self.batches}")
        if not self.sparsities or any(not 0.0 <= s < 1.0 for s in self.sparsities):
            raise MoefyError(f"sparsities must be in [0, 1), got {self.sparsities}")
        if self.dtype not in DTYPES:
            raise MoefyError(
                f"dtype must be one of {', '.join(sorted(DTYPES))}, got {self.dtype!r}"
            )
        if self.rounds is not None and self.rounds < 1:
            raise MoefyError(f"rounds must be >= 1, got {self.rounds}")
        if self.calls_per_graph < 1:
            raise MoefyError(f"calls_per_graph must be >= 1, got {self.calls_per_graph}")
        if not (self.linear or self.mlp):
            raise MoefyError("nothing to measure: enable linear or mlp")
        self.check_version()

    def rounds_or_default(self) -> int:
        return self.rounds or (10 if self.quick else 50)

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# --- arithmetic without a GPU ---------------------------------------------------------------


def copies_for(weight_bytes: int, l2_bytes: int, multiple: int = L2_MULTIPLE) -> int:
    """Weight copies whose rotation spans ``multiple`` L2 caches (at least 2).

    Example:
        >>> copies_for(4096 * 4096 * 2, 50 * 2**20)
        7
    """
    return max(2, math.ceil(multiple * l2_bytes / weight_bytes))


def kept_rows(x: torch.Tensor, threshold: torch.Tensor) -> int:
    """Inputs (rows of the (I, O) weight) that at least one token keeps: the rows read."""
    keep = ~(x.abs() <= threshold) & (x != 0)  # (N, I), the kernel's rule
    return int(keep.any(0).sum())


def linear_bytes(shape: WeightShape, batch: int, rows: int, element_bytes: int) -> int:
    """Bytes a linear must move: ``rows`` weight rows, the inputs and the outputs."""
    return (rows * shape.n_out + batch * (shape.n_in + shape.n_out)) * element_bytes


def mlp_bytes(shape: MLPShape, batch: int, experts: int, element_bytes: int) -> int:
    """Bytes the expert MLP must move: ``experts`` experts' blocks, the inputs and outputs."""
    return experts * shape.expert_bytes(element_bytes) + 2 * batch * shape.d_model * element_bytes


def teal_mlp_bytes(
    shape: MLPShape, batch: int, input_rows: int, hidden_rows: int, element_bytes: int
) -> int:
    """Bytes the TEAL MLP must move: ``input_rows`` rows of the gate and up weights (D, F)
    each, ``hidden_rows`` rows of the down weight (F, D), the inputs and outputs (intermediates
    are left out, as for dense: N x F values, small against the weights at batch <= 16)."""
    D, F = shape.d_model, shape.d_ff
    return (input_rows * 2 * F + hidden_rows * D + 2 * batch * D) * element_bytes


def sparsity_threshold(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A 0-d threshold (in x's dtype) that drops ``sparsity`` of x's entries (|x| <= it)."""
    if sparsity <= 0.0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x.abs().float().flatten().quantile(sparsity).to(x.dtype)


def experts_per_token(num_experts: int, sparsity: float) -> int:
    """Experts each token runs at ``sparsity`` (at least one)."""
    return max(1, round((1.0 - sparsity) * num_experts))


def result_row(
    *,
    shape: str,
    batch: int,
    method: str,
    sparsity: float,
    dense_seconds: float,
    sparse_seconds: float,
    sparse_bytes: int,
    dense_bytes: int,
    bandwidth: float,
) -> dict[str, object]:
    """One ``ffn`` row in :func:`moefy.bench.run.run_bench`'s layout, plus the bytes read.

    ``limit_speedup`` is dense time over the time ``sparse_bytes`` take at ``bandwidth``;
    ``of_bandwidth`` how close the sparse kernel came to that time.

    Example:
        >>> result_row(shape="s", batch=1, method="teal", sparsity=0.5, dense_seconds=4e-5,
        ...            sparse_seconds=2.5e-5, sparse_bytes=60_000_000, dense_bytes=120_000_000,
        ...            bandwidth=3e12)["limit_speedup"]
        2.0
    """
    limit_seconds = sparse_bytes / bandwidth
    return {
        "threads": NO_THREADS,
        "shape": shape,
        "batch": batch,
        "method": method,
        "active": 1.0 - sparsity,
        "dense_ms": dense_seconds * 1e3,
        "sparse_ms": sparse_seconds * 1e3,
        "speedup": dense_seconds / sparse_seconds,
        "limit_speedup": dense_seconds / limit_seconds,
        "of_bandwidth": limit_seconds / sparse_seconds,
        "dense_of_bandwidth": dense_bytes / bandwidth / dense_seconds,
        "sparse_mb": sparse_bytes / 1e6,
    }


def table_rows(results: dict[str, Any]) -> list[dict[str, object]]:
    """The rows of :func:`gpu_report`'s table (times in microseconds: GPU kernels are short)."""
    return [
        {
            "shape": row["shape"],
            "batch": row["batch"],
            "method": row["method"],
            "sparsity": f"{1.0 - row['active']:.0%}",
            "dense us": f"{row['dense_ms'] * 1e3:.1f}",
            "sparse us": f"{row['sparse_ms'] * 1e3:.1f}",
            "speedup": f"{row['speedup']:.2f}x",
            "limit": f"{row['limit_speedup']:.2f}x",
            "of bandwidth": f"{row['of_bandwidth']:.0%}",
            "dense of bw": f"{row['dense_of_bandwidth']:.0%}",
        }
        for row in results["ffn"]
    ]


def gpu_report(results: dict[str, Any]) -> Report:
    """The device and copy bandwidth line and the kernel table of :func:`run_gpu_bench`.

    Args:
        results: what :func:`run_gpu_bench` returned.

    Returns:
        Lines and tables in print order (``moefy bench --device cuda`` prints them).

    Example:
        >>> gpu_report(results)[0]
        'kernels: triton on H100; copy bandwidth: cuda:0 2930 GB/s'
    """
    bandwidth = ", ".join(f"{k} {v:.0f} GB/s" for k, v in results["bandwidth_gbps"].items())
    device = results["machine_before"].get("gpu", "?")
    return [
        f"kernels: {results['kernels']} on {device}; copy bandwidth: {bandwidth}",
        Table(
            "GPU kernels vs cuBLAS dense (CUDA graphs, weights rotated past L2; speedup = dense / "
            "sparse median; limit = dense / (bytes read / copy bandwidth))",
            table_rows(results),
        ),
    ]


# --- measurement (needs CUDA) ----------------------------------------------------------------


def gpu_machine(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: the GPU, its memory and L2, torch, CUDA and triton."""
    from moefy.bench.run import machine

    properties = torch.cuda.get_device_properties(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        **machine(),
        "gpu": properties.name,
        "gpu_memory_gb": properties.total_memory / 1e9,
        "l2_bytes": getattr(properties, "L2_cache_size", None),
        "multiprocessors": properties.multi_processor_count,
        "cuda": torch.version.cuda,
        "triton": triton_version,
    }


def copy_bandwidth(device: torch.device, *, rounds: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written), median."""
    source = torch.empty(COPY_BUFFER_BYTES, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    seconds = _event_medians({"copy": lambda: target.copy_(source)}, rounds=rounds, calls=1)
    return 2 * COPY_BUFFER_BYTES / seconds["copy"]


def _event_medians(
    variants: dict[str, Callable[[], object]], *, rounds: int, calls: int
) -> dict[str, float]:
    """Median seconds per call of each variant; each replay of a variant runs ``calls`` calls.

    Variants are timed round-robin with CUDA events, all recorded before one synchronisation.
    """
    for call in variants.values():  # warm-up: compilation, allocations, autotuning
        call()
    torch.cuda.synchronize()
    events = {name: [] for name in variants}
    for _ in range(rounds):
        for name, call in variants.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {
        name: statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3 / calls
        for name, pairs in events.items()
    }


def _graphed(calls: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One CUDA graph running ``calls`` in order; returns its replay."""
    for call in calls:  # compile and allocate outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph.replay


def _rotating_graph(call: Callable[[int], object], copies: int, calls: int):
    """A graph of ``calls`` calls ``call(copy)``, the weight copy advancing each call."""
    return _graphed([functools.partial(call, i % copies) for i in range(calls)])


class _RandomWeights:
    """Uniform random weights of the config's dtype on ``device`` (speed ignores the values)."""

    def __init__(self, config: GpuBenchConfig, device: torch.device) -> None:
        self.dtype = config.torch_dtype()
        self.element_bytes = torch.empty((), dtype=self.dtype).element_size()
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(config.seed)

    def __call__(self, *size: int) -> torch.Tensor:
        weight = torch.empty(size, dtype=self.dtype, device=self.device)
        return weight.uniform_(-WEIGHT_SCALE, WEIGHT_SCALE, generator=self.generator)

    def tokens(self, batch: int, width: int) -> torch.Tensor:
        return torch.randn(
            batch, width, dtype=self.dtype, device=self.device, generator=self.generator
        )


def _linear_rows(config: GpuBenchConfig, device, bandwidth: float, l2_bytes: int, say) -> list:
    random = _RandomWeights(config, device)
    element = random.element_bytes
    rows = []
    for shape in LINEAR_SHAPES:
        say(f"linear {shape.name}")
        copies = copies_for(shape.weight_bytes(element), l2_bytes)
        weights = [random(shape.n_out, shape.n_in) for _ in range(copies)]  # (O, I) each
        weights_t = [w.t().contiguous() for w in weights]  # (I, O) each
        for batch in config.batches:
            x = random.tokens(batch, shape.n_in)
            dense = functools.partial(_dense_linear, x, weights)
            variants = {"dense": _rotating_graph(dense, copies, config.calls_per_graph)}
            moved = {}
            for sparsity in config.sparsities:
                thr = sparsity_threshold(x, sparsity)
                name = f"teal@{sparsity}"
                sparse = functools.partial(_threshold_linear, x, weights_t, thr)
                variants[name] = _rotating_graph(sparse, copies, config.calls_per_graph)
                moved[name] = linear_bytes(shape, batch, kept_rows(x, thr), element)
            dense_bytes = linear_bytes(shape, batch, shape.n_in, element)
            rows += _rows(config, shape.name, batch, variants, moved, dense_bytes, bandwidth)
    return rows


def _dense_linear(x: torch.Tensor, weights: list[torch.Tensor], i: int) -> torch.Tensor:
    return Fn.linear(x, weights[i])


def _threshold_linear(
    x: torch.Tensor, weights_t: list[torch.Tensor], thr: torch.Tensor, i: int
) -> torch.Tensor:
    from moefy.kernels import threshold_linear

    return threshold_linear(x, weights_t[i], None, thr, backend="triton")


def _dense_mlp(x: torch.Tensor, weights: list[tuple[torch.Tensor, ...]], i: int) -> torch.Tensor:
    gate, up, down = weights[i]
    return Fn.linear(Fn.silu(Fn.linear(x, gate)) * Fn.linear(x, up), down)


def _threshold_mlp(
    x: torch.Tensor,
    weights_t: list[tuple[torch.Tensor, ...]],
    input_threshold: torch.Tensor,
    hidden_threshold: torch.Tensor,
    i: int,
) -> torch.Tensor:
    from moefy.kernels import threshold_gate_up, threshold_linear

    gate_t, up_t, down_t = weights_t[i]
    gate, up = threshold_gate_up(x, gate_t, up_t, None, None, input_threshold, backend="triton")
    return threshold_linear(Fn.silu(gate) * up, down_t, None, hidden_threshold, backend="triton")


def _expert_mlp(
    x: torch.Tensor, mask: torch.Tensor, weights: list[tuple[torch.Tensor, ...]], i: int
) -> torch.Tensor:
    from moefy.kernels import expert_ffn

    w_in, w_out = weights[i]
    return expert_ffn(x, mask, w_in, w_out, None, None, ACT, True, backend="triton")


def _rows(config, shape_name, batch, variants, moved, dense_bytes, bandwidth) -> list:
    """Time ``variants`` (dense first, then ``method@sparsity``) and make one row per sparse one."""
    medians = _event_medians(
        variants, rounds=config.rounds_or_default(), calls=config.calls_per_graph
    )
    return [
        result_row(
            shape=shape_name,
            batch=batch,
            method=name.partition("@")[0],
            sparsity=float(name.partition("@")[2]),
            dense_seconds=medians["dense"],
            sparse_seconds=medians[name],
            sparse_bytes=bytes_moved,
            dense_bytes=dense_bytes,
            bandwidth=bandwidth,
        )
        for name, bytes_moved in moved.items()
    ]


def _mlp_rows(config: GpuBenchConfig, device, bandwidth: float, l2_bytes: int, say) -> list:
    from moefy.kernels import reference

    random = _RandomWeights(config, device)
    element = random.element_bytes
    rows = []
    for shape in MLP_SHAPES:
        say(f"mlp {shape.name}")
        D, F, E, S = shape.d_model, shape.d_ff, shape.num_experts, shape.expert_size
        copies = copies_for(shape.dense_bytes(element), l2_bytes)
        dense_weights = [(random(F, D), random(F, D), random(D, F)) for _ in range(copies)]
        expert_weights = [(random(E, 2 * S, D), random(E, S, D)) for _ in range(copies)]
        # (D, F), (D, F), (F, D): the rows a dropped input or activation lets the kernels skip
        teal_weights = [tuple(w.t().contiguous() for w in ws) for ws in dense_weights]
        gate_t, up_t, _ = teal_weights[0]  # the thresholds are set on copy 0
        for batch in config.batches:
            x = random.tokens(batch, D)
            dense = functools.partial(_dense_mlp, x, dense_weights)
            variants = {"dense": _rotating_graph(dense, copies, config.calls_per_graph)}
            moved = {}
            for sparsity in config.sparsities:
                scores = torch.rand(batch, E, device=device, generator=random.generator)
                top = scores.topk(experts_per_token(E, sparsity), dim=1).indices
                mask = torch.zeros(batch, E, dtype=torch.bool, device=device)
                mask.scatter_(1, top, True)  # (N, E)
                name = f"experts@{sparsity}"
                sparse = functools.partial(_expert_mlp, x, mask, expert_weights)
                variants[name] = _rotating_graph(sparse, copies, config.calls_per_graph)
                moved[name] = mlp_bytes(shape, batch, int(mask.any(0).sum()), element)
            for sparsity in config.sparsities:
                # one threshold for the input, one for the activation, each set from this
                # batch (copy 0) to drop ``sparsity`` of its entries, as TEAL's calibration would
                input_threshold = sparsity_threshold(x, sparsity)
                gate, up = reference.threshold_gate_up(x, gate_t, up_t, None, None, input_threshold)
                hidden = Fn.silu(gate) * up  # (N, F)
                hidden_threshold = sparsity_threshold(hidden, sparsity)
                name = f"teal@{sparsity}"
                sparse = functools.partial(
                    _threshold_mlp, x, teal_weights, input_threshold, hidden_threshold
                )
                variants[name] = _rotating_graph(sparse, copies, config.calls_per_graph)
                read_in = kept_rows(x, input_threshold)
                read_hidden = kept_rows(hidden, hidden_threshold)
                moved[name] = teal_mlp_bytes(shape, batch, read_in, read_hidden, element)
            dense_bytes = shape.dense_bytes(element) + 2 * batch * D * element
            rows += _rows(config, shape.name, batch, variants, moved, dense_bytes, bandwidth)
    return rows


def run_gpu_bench(
    config: GpuBenchConfig, *, device: str | torch.device = "cuda", progress=None
) -> dict[str, Any]:
    """Time the Triton kernels against cuBLAS dense on ``device``; JSON-ready results.

    Args:
        config: what to measure.
        device: a CUDA device.
        progress: optional ``str -> None`` told what is being measured.

    Returns:
        ``{"config", "machine_before", "machine_after", "kernels", "bandwidth_gbps", "ffn",
        "decode"}`` as :func:`moefy.bench.run.run_bench` returns (``decode`` empty here).

    Raises:
        MoefyError: no CUDA device, or the triton backend cannot run.

    Example:
        >>> results = run_gpu_bench(GpuBenchConfig(quick=True))
        >>> gpu_report(results)
    """
    from moefy.kernels import Backend
    from moefy.kernels.backend import check_available

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise MoefyError("the GPU benchmark needs a CUDA device; run moefy bench on the CPU")
    check_available(Backend.TRITON)
    say = progress or (lambda _message: None)
    before = gpu_machine(device)
    l2_bytes = before["l2_bytes"] or 50 * 2**20  # H100's 50 MiB where torch does not say
    say("copy bandwidth")
    bandwidth = copy_bandwidth(device, rounds=config.rounds_or_default())
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "machine_before": before,
        "kernels": Backend.TRITON.value,
        "bandwidth_gbps": {str(device): bandwidth / 1e9},
        "ffn": [],
        "decode": [],
    }
    with torch.inference_mode():
        if config.linear:
            results["ffn"] += _linear_rows(config, device, bandwidth, l2_bytes, say)
        if config.mlp:
            results["ffn"] += _mlp_rows(config, device, bandwidth, l2_bytes, say)
    results["machine_after"] = gpu_machine(device)
    return results
