"""The carve path at users' sizes: profile and carve Llama-3-8B-shaped FFN layers, layer by layer.

Shape legend:
    N: tokens, D: model width (d_model), F: FFN width (d_ff), T: sampled pattern tokens,
    E: experts of one layer (F / S), S: neurons per expert

Parts (each runs in its own process when several are asked for, so each peak is its own):

- ``a``: one gated SiLU FFN layer (D=4096, F=14336; random weights, normal std 0.02, fp32) and
  16,384 tokens of random activations x ~ N(0, 1), profiled (activation rate: share of tokens
  for which a neuron is among the token's top 10 % |h|; contribution-share patterns
  ``c / c.sum()``, ``c = |h| * ||W_down[:, j]||``, on 512 evenly spaced tokens) and carved
  (12.5 % of the experts shared: the neurons of highest rate; the rest clustered into experts of
  16 neurons by the registered ``activation`` split on their patterns, or, where that method is
  not registered, by :func:`moefy.moe.split.balanced_kmeans` on the centred, normalised pattern
  rows). Goal: under 20 s on 2 cores. h is computed in chunks of tokens, so memory stays bounded.
- ``b``: 32 such layers with bf16 weights and 4,096 tokens, generated and processed one at a
  time (the whole model is 16 GB of weights; d_ff x d_ff co-activation counts would add
  14336^2 * 4 B * 32 = 26 GB, 52 GB in float64): time per layer, peak memory, and the bytes of
  statistics the carve keeps per layer (rates and patterns) beside the co-activation matrix.
- ``c``: SmolLM2-135M converted end to end: load, profile 8,192 BBC News tokens, then
  ``moefy_`` with 12.5 % shared experts of 8 neurons (``activation`` split). Goal: under 60 s.

Memory is the process's peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which
counts torch's tensors; ``tracemalloc`` does not see them) and the resident set after each layer
(``/proc/self/statm``). bf16 weights are upcast to float32 one layer at a time for the products:
stock torch's bf16 GEMM is several times slower than float32 on AVX2 CPUs.

Run: .venv/bin/python benchmarks/carve_scale.py [--parts a,b,c] [--layers 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import nn

from moefy.arch import FFNWeights
from moefy.errors import MoefyError
from moefy.io import write_json
from moefy.moe.layout import ExpertLayout
from moefy.moe.split import SPLIT_METHODS, SplitRequest, balanced_kmeans, split_neurons
from moefy.profiling.accumulators import top_thresholds
from moefy.profiling.patterns import pattern_positions, pattern_slots, top_count

PARTS = ("a", "b", "c")
D_MODEL, D_FF = 4096, 14336  # Llama-3-8B
LAYER_TOKENS, MODEL_TOKENS, MODEL_LAYERS = 16_384, 4_096, 32
CONVERT_MODEL, CONVERT_DATA = "smollm2-135m", "bbc-news"
CONVERT_TOKENS, CONVERT_EXPERT_SIZE = 8192, 8
WEIGHT_STD = 0.02
TOP_SHARE, PATTERN_TOKENS = 0.1, 512
SHARED, EXPERT_SIZE = 0.125, 16
CHUNK_TOKENS = 1024  # tokens per h chunk: (chunk, F) float32 is 59 MB at F=14336
LAYER_GOAL_S, CONVERT_GOAL_S = 20.0, 60.0
SPLIT_METHOD = "activation"
GIB = 2**30
_TINY = torch.finfo(torch.float32).tiny


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _activation_split_available() -> bool:
    with contextlib.suppress(ImportError):  # the module registers the method when imported
        import moefy.moe.split_patterns  # noqa: F401
    return SPLIT_METHOD in SPLIT_METHODS


def random_layer(d_model: int, d_ff: int, dtype: torch.dtype, seed: int) -> FFNWeights:
    """A gated SiLU FFN with normal(0, WEIGHT_STD) weights stored in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)

    def weights(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype).normal_(0.0, WEIGHT_STD, generator=gen)

    return FFNWeights(
        w_up=weights(d_ff, d_model), w_down=weights(d_model, d_ff), act=nn.SiLU(),
        w_gate=weights(d_ff, d_model),
    )  # fmt: skip


@dataclass
class LayerStats:
    """What carving one layer needs: (F,) activation rates and (F, T) contribution patterns."""

    rates: torch.Tensor
    patterns: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rates, self.patterns))


def profile_layer(
    layer: FFNWeights, x: torch.Tensor, *, pattern_tokens: int, chunk: int, seconds: dict
) -> LayerStats:
    """Activation rates and patterns of ``layer`` on tokens ``x`` (N, D), in chunks of tokens.

    Adds the seconds of the products (``h``) and of the statistics (``stats``) to ``seconds``.
    """
    start = time.perf_counter()
    gate, up = layer.w_gate.float(), layer.w_up.float()  # (F, D): float32 copies of bf16
    neuron_norms = layer.w_down.float().norm(dim=0)  # (F,)
    seconds["h"] = seconds.get("h", 0.0) + time.perf_counter() - start
    N, F = x.shape[0], gate.shape[0]
    k = top_count(TOP_SHARE, F)
    positions = pattern_positions(N, pattern_tokens)  # (T,)
    top_counts = torch.zeros(F, dtype=torch.float64)
    patterns = torch.zeros(F, 0 if positions is None else positions.numel())  # (F, T)
    for first in range(0, N, chunk):
        start = time.perf_counter()
        x_chunk = x[first : first + chunk]  # (n, D)
        magnitude = (Fn.silu(x_chunk @ gate.T) * (x_chunk @ up.T)).abs_()  # (n, F)
        middle = time.perf_counter()
        threshold = top_thresholds(magnitude, k).clamp_min_(_TINY)  # (n,)
        top_counts += (magnitude >= threshold[:, None]).sum(0)
        if positions is not None:
            index = torch.arange(first, first + x_chunk.shape[0])
            rows, slots = pattern_slots(positions, index)  # (M,), (M,)
            contribution = magnitude[rows] * neuron_norms  # (M, F)
            patterns[:, slots] = (contribution / contribution.sum(1, keepdim=True)).T
        seconds["h"] += middle - start
        seconds["stats"] = seconds.get("stats", 0.0) + time.perf_counter() - middle
    return LayerStats((top_counts / N).float(), patterns)


def _routed_labels(
    layer: FFNWeights, stats: LayerStats, rest: torch.Tensor, size: int, seed: int
) -> tuple[torch.Tensor, str]:
    """(F_r,) expert of each routed neuron (rest), and the method that chose them."""
    experts = rest.numel() // size
    patterns = stats.patterns[rest]  # (F_r, T)
    if _activation_split_available():
        sliced = FFNWeights(
            w_up=layer.w_up[rest], w_down=layer.w_down[:, rest], act=layer.act,
            w_gate=layer.w_gate[rest],
        )  # fmt: skip
        layout = ExpertLayout(experts, size, (size,) * experts)
        request = SplitRequest(weights=sliced, layout=layout, seed=seed, patterns=patterns)
        slots = split_neurons(SPLIT_METHOD, request)  # (E_r, S) local neuron ids
        labels = torch.empty(rest.numel(), dtype=torch.long)
        labels[slots.flatten()] = torch.arange(experts).repeat_interleave(size)
        return labels, SPLIT_METHOD
    centred = patterns - patterns.mean(dim=1, keepdim=True)  # balanced_kmeans normalises rows
    capacities = torch.full((experts,), size, dtype=torch.long)
    return balanced_kmeans(centred, capacities, seed=seed), "balanced_kmeans (direct)"


def carve_layer(
    layer: FFNWeights, stats: LayerStats, *, shared: float, expert_size: int, seed: int
) -> tuple[torch.Tensor, str]:
    """The (E, S) expert slot table: shared experts (highest rates) first, then routed ones.

    Returns:
        ``(slots, method)``: dense neuron ids per expert slot, and the clustering used.
    """
    F = stats.rates.numel()
    if F % expert_size:
        raise MoefyError(f"expert size {expert_size} does not divide d_ff={F}")
    experts = F // expert_size
    num_shared = round(shared * experts)
    if num_shared >= experts:
        raise MoefyError(f"shared={shared} leaves no routed expert of {experts}")
    order = stats.rates.argsort(descending=True, stable=True)  # (F,)
    shared_ids, rest = order[: num_shared * expert_size], order[num_shared * expert_size :]
    rest = rest.sort().values  # (F_r,) routed neurons in dense order
    labels, method = _routed_labels(layer, stats, rest, expert_size, seed)
    routed = rest[labels.argsort(stable=True)].view(-1, expert_size)  # (E_r, S)
    return torch.cat([shared_ids.view(num_shared, expert_size), routed]), method


def _check_slots(slots: torch.Tensor, d_ff: int) -> None:
    if slots.flatten().sort().values.tolist() != list(range(d_ff)):
        raise MoefyError("the carve lost or repeated neurons")  # a bug, not bad input


def carve_one(
    layer: FFNWeights, x: torch.Tensor, args: argparse.Namespace, seed: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """Profile and carve one layer: its figures (seconds per stage, bytes of statistics) and
    its (E, S) slot table."""
    seconds: dict[str, float] = {}
    stats = profile_layer(
        layer, x, pattern_tokens=args.pattern_tokens, chunk=args.chunk, seconds=seconds
    )
    start = time.perf_counter()
    slots, method = carve_layer(
        layer, stats, shared=args.shared, expert_size=args.expert_size, seed=seed
    )
    seconds["cluster"] = time.perf_counter() - start
    _check_slots(slots, layer.d_ff)
    flops = 4 * x.shape[0] * layer.d_model * layer.d_ff  # gate and up products
    row = {
        "seconds": sum(seconds.values()),
        **{f"{stage}_s": value for stage, value in seconds.items()},
        "h_gflops": flops / seconds["h"] / 1e9,
        "method": method,
        "experts": int(slots.shape[0]),
        "shared_experts": round(args.shared * slots.shape[0]),
        "stats_bytes": stats.nbytes,
    }
    return row, slots


def part_a(args: argparse.Namespace) -> dict[str, Any]:
    """One layer, fp32 (or ``--dtype``), ``--tokens`` tokens (default 16,384)."""
    tokens = args.tokens or LAYER_TOKENS
    start = time.perf_counter()
    layer = random_layer(args.d_model, args.d_ff, getattr(torch, args.dtype), args.seed)
    x = torch.randn(tokens, args.d_model, generator=torch.Generator().manual_seed(args.seed))
    made = time.perf_counter() - start
    row, _slots = carve_one(layer, x, args, args.seed)
    return {
        "part": "a", "d_model": args.d_model, "d_ff": args.d_ff, "tokens": tokens,
        "dtype": args.dtype, "weights_s": made, **row, "goal_s": LAYER_GOAL_S,
        "met": row["seconds"] < LAYER_GOAL_S, "peak_rss_gib": _peak_rss_bytes() / GIB,
    }  # fmt: skip


def part_b(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """``--layers`` bf16 layers (default 32), ``--tokens`` tokens (default 4,096), one at a time."""
    tokens = args.tokens or MODEL_TOKENS
    x = torch.randn(tokens, args.d_model, generator=torch.Generator().manual_seed(args.seed))
    rows, slot_tables = [], []
    start = time.perf_counter()
    for index in range(args.layers):
        layer_start = time.perf_counter()
        layer = random_layer(args.d_model, args.d_ff, torch.bfloat16, args.seed + index)
        made = time.perf_counter() - layer_start
        row, slots = carve_one(layer, x, args, args.seed + index)
        del layer  # only the slot table outlives the layer
        slot_tables.append(slots)
        row.update(layer=index, weights_s=made, seconds=time.perf_counter() - layer_start)
        row.update(rss_gib=_rss_bytes() / GIB, peak_rss_gib=_peak_rss_bytes() / GIB)
        rows.append(row)
        say(f"layer {index}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB")
    total = time.perf_counter() - start
    F = args.d_ff
    return {
        "part": "b", "d_model": args.d_model, "d_ff": F, "tokens": tokens, "dtype": "bfloat16",
        "layers": args.layers, "seconds": total, "per_layer_s": total / max(1, args.layers),
        "peak_rss_gib": _peak_rss_bytes() / GIB,
        "weights_bytes_per_layer": 3 * args.d_model * F * 2,
        "stats_bytes_per_layer": rows[0]["stats_bytes"] if rows else 0,
        "coactivation_bytes_per_layer": {"float32": F * F * 4, "float64": F * F * 8},
        "slot_table_bytes": sum(t.numel() * t.element_size() for t in slot_tables),
        "rows": rows,
    }  # fmt: skip


def _convert_missing() -> str | None:
    """Why part c cannot run yet (shared experts or activation profiles missing), or None."""
    from moefy.moe import MoEfyConfig
    from moefy.profiling import ProfileConfig

    fields = {
        "MoEfyConfig.shared": "shared" in MoEfyConfig.__dataclass_fields__,
        "ProfileConfig.pattern_tokens": "pattern_tokens" in ProfileConfig.__dataclass_fields__,
    }
    missing = [name for name, present in fields.items() if not present]
    return None if not missing else f"not in this moefy yet: {', '.join(missing)}"


def part_c(args: argparse.Namespace) -> dict[str, Any]:
    """SmolLM2-135M: load, profile ``--convert-tokens`` tokens, moefy_ with shared experts."""
    missing = _convert_missing()
    if missing:
        return {"part": "c", "skipped": missing}
    from moefy.data.text import load_text
    from moefy.models.load import load_model
    from moefy.moe import MoEfyConfig, moefy_
    from moefy.profiling import ProfileConfig, profile

    method = SPLIT_METHOD if _activation_split_available() else "params"
    config = MoEfyConfig(expert_size=CONVERT_EXPERT_SIZE, shared=args.shared, method=method)
    start = time.perf_counter()
    model, tokenizer = load_model(CONVERT_MODEL)
    blocks = load_text(CONVERT_DATA).blocks(
        tokenizer, split="calibration", n_tokens=args.convert_tokens
    )
    loaded = time.perf_counter()
    result = profile(model, blocks, ProfileConfig(top_share=TOP_SHARE))
    profiled = time.perf_counter()
    moefy_(model, config, profile=result)
    converted = time.perf_counter()
    seconds = converted - loaded
    return {
        "part": "c", "model": CONVERT_MODEL, "tokens": blocks.n_tokens, "method": method,
        "expert_size": CONVERT_EXPERT_SIZE, "shared": args.shared, "load_s": loaded - start,
        "profile_s": profiled - loaded, "convert_s": converted - profiled, "seconds": seconds,
        "goal_s": CONVERT_GOAL_S, "met": seconds < CONVERT_GOAL_S,
        "peak_rss_gib": _peak_rss_bytes() / GIB,
    }  # fmt: skip


def run_part(part: str, args: argparse.Namespace) -> dict[str, Any]:
    say = (lambda message: print(message, flush=True)) if not args.quiet else (lambda _m: None)
    say(f"part {part}: {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    if part == "a":
        return part_a(args)
    if part == "b":
        return part_b(args, say)
    return part_c(args)


def _in_child(part: str, argv: Sequence[str]) -> dict[str, Any]:
    """Run one part in a fresh process (its own peak memory) and read its JSON back."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / f"{part}.json"
        command = [sys.executable, __file__, *argv, "--parts", part, "--json", str(out)]
        subprocess.run(command, check=True)
        return json.loads(out.read_text())["parts"][0]


def _details(r: dict[str, Any]) -> str:
    if r["part"] == "a":
        return (
            f"1 layer {r['d_model']}->{r['d_ff']} {r['dtype']}, {r['tokens']} tokens: h "
            f"{r['h_s']:.1f} s ({r['h_gflops']:.0f} GFLOP/s), stats {r['stats_s']:.1f} s, "
            f"cluster {r['cluster_s']:.1f} s ({r['method']})"
        )
    if r["part"] == "b":
        mib = 2**20
        return (
            f"{r['layers']} layers {r['d_model']}->{r['d_ff']} bf16, {r['tokens']} tokens: "
            f"{r['per_layer_s']:.1f} s/layer; statistics {r['stats_bytes_per_layer'] / mib:.1f} "
            f"MiB/layer vs co-activation {r['coactivation_bytes_per_layer']['float32'] / mib:.0f}"
            " MiB (float32)"
        )
    return (
        f"{r['model']}, {r['tokens']} tokens: load {r['load_s']:.1f} s (not counted), profile "
        f"{r['profile_s']:.1f} s, convert {r['convert_s']:.1f} s ({r['method']})"
    )


def _table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'part':<5} {'seconds':>8} {'peak RSS':>10}  {'goal':<14} what"]
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['part']:<5} skipped: {r['skipped']}")
            continue
        goal = f"< {r['goal_s']:.0f} s: {'met' if r['met'] else 'short'}" if "goal_s" in r else ""
        lines.append(
            f"{r['part']:<5} {r['seconds']:8.1f} {r['peak_rss_gib']:6.2f} GiB  {goal:<14} "
            f"{_details(r)}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from a,b,c")
    parser.add_argument("--d-model", type=int, default=D_MODEL)
    parser.add_argument("--d-ff", type=int, default=D_FF)
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help=f"tokens of a and b (default {LAYER_TOKENS} and {MODEL_TOKENS})",
    )
    parser.add_argument("--layers", type=int, default=MODEL_LAYERS, help="layers of part b")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="weights of part a"
    )
    parser.add_argument("--convert-tokens", type=int, default=CONVERT_TOKENS)
    parser.add_argument("--pattern-tokens", type=int, default=PATTERN_TOKENS)
    parser.add_argument("--expert-size", type=int, default=EXPERT_SIZE)
    parser.add_argument("--shared", type=float, default=SHARED)
    parser.add_argument("--chunk", type=int, default=CHUNK_TOKENS, help="tokens per h chunk")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="print the table only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.part_list = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not args.part_list or set(args.part_list) - set(PARTS):
        parser.error(f"--parts must be among {','.join(PARTS)}, got {args.parts!r}")
    for name in ("d_model", "d_ff", "layers", "convert_tokens", "expert_size", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.shared < 1.0:
        parser.error("--shared must be in [0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.part_list) == 1:
        results = [run_part(args.part_list[0], args)]
    else:
        passed = _without(argv, ("--parts", "--json"))
        results = [_in_child(part, [*passed, "--child"]) for part in args.part_list]
    figures = {
        "machine": {"cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average_after": list(os.getloadavg())},
        "parts": results,
    }  # fmt: skip
    if not args.child:
        print(_table(results))
    if args.json:
        write_json(args.json, figures)
    return figures


def _without(argv: Sequence[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without the given options and their values (``--opt v`` or ``--opt=v``)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in options:
            skip = True
        elif not item.startswith(tuple(f"{option}=" for option in options)):
            kept.append(item)
    return kept


if __name__ == "__main__":
    main()
