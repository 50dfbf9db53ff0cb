"""``moefy bench``: FFN-level and end-to-end decode speed, dense and sparse in the same run.

For each thread count: the streaming read bandwidth, then the FFN table (see
:mod:`moefy.bench.ffn`), then decode tokens per second of the model dense, moefied with routers
at each expert fraction, and TEAL-sparsified (see :mod:`moefy.bench.variants`). Every ratio
compares variants timed round-robin in the same rounds; every limit is the speed-up the bytes a
variant reads allow at the measured bandwidth.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moefy.errors import MoefyError
from moefy.jsonconfig import JsonConfig

BENCH_VERSION = 1
DEFAULT_PROMPT = "The central bank said on Tuesday that interest rates"
PARTS = ("ffn", "decode", "expert-size", "balance")
BALANCE_KEEP = 0.25  # the balance table's expert share when no expert fractions are given


@dataclass(frozen=True)
class BenchConfig(JsonConfig):
    """What ``moefy bench`` measures.

    Attributes:
        threads: torch thread counts to run at (default 1 and every core).
        quick: fewer rounds and shorter decodes (minutes, noisier).
        rounds: timed calls per FFN variant (default 15, quick 5).
        decode_rounds: timed generates per decode variant (default 5, quick 3).
        new_tokens: tokens per timed generate (default 64, quick 16).
        parts: which tables to measure, from ``ffn``, ``decode``, ``expert-size`` (see
            :mod:`moefy.bench.expert_size`) and ``balance`` (see :mod:`moefy.bench.balance`).
        model: built-in name or folder of the end-to-end model.
        data: built-in text for TEAL's calibration.
        expert_fractions: router budgets of the moefied variants.
        teal_sparsity: TEAL's target share of zeroed inputs.
        methods: further training-free methods timed beside TEAL at the same target, as
            method specs (``rotate``, ``scap:attention=true``, see
            :func:`moefy.sparsify.config.split_method_spec`), each calibrated like TEAL's copy.
        carved_keep: share of the dense FFN FLOPs of the carved variant (0: none).
        compile: time decoding through :class:`moefy.decoding.StaticDecoder` (static cache,
            ``torch.compile``d step, dense and sparse alike) instead of ``generate``.
        version: config format version.

    Example:
        >>> BenchConfig(threads=(1,), quick=True).rounds_or_default()
        5
    """

    threads: tuple[int, ...] = ()
    quick: bool = False
    rounds: int | None = None
    decode_rounds: int | None = None
    new_tokens: int | None = None
    parts: tuple[str, ...] = PARTS
    model: str = "smollm2-135m"
    data: str = "bbc-news"
    expert_fractions: tuple[float, ...] = (0.25, 0.125)
    teal_sparsity: float = 0.5
    methods: tuple[str, ...] = ()
    carved_keep: float = 0.25
    compile: bool = False
    version: int = BENCH_VERSION

    VERSION: ClassVar[int] = BENCH_VERSION

    def __post_init__(self) -> None:
        if any(not isinstance(t, int) or t < 1 for t in self.threads):
            raise MoefyError(f"thread counts must be integers >= 1, got {self.threads}")
        for name in ("rounds", "decode_rounds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MoefyError(f"{name} must be >= 1, got {value}")
        if self.new_tokens is not None and self.new_tokens < 2:
            raise MoefyError(f"new_tokens must be >= 2 to time decoding, got {self.new_tokens}")
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown or not self.parts:
            raise MoefyError(f"bench parts must be among {', '.join(PARTS)}, got {self.parts}")
        if any(not 0.0 < f <= 1.0 for f in self.expert_fractions):
            raise MoefyError(f"expert fractions must be in (0, 1], got {self.expert_fractions}")
        if not 0.0 <= self.teal_sparsity < 1.0:
            raise MoefyError(f"teal sparsity must be in [0, 1), got {self.teal_sparsity}")
        if not 0.0 <= self.carved_keep <= 1.0:
            raise MoefyError(f"carved keep must be in [0, 1], got {self.carved_keep}")
        if self.methods:
            from moefy.sparsify.config import config_from_spec

            for spec in self.methods:
                config_from_spec(spec, sparsity=max(self.teal_sparsity, 0.5))  # fails early
        self.check_version()

    def thread_counts(self) -> tuple[int, ...]:
        return self.threads or tuple(sorted({1, os.cpu_count() or 1}))

    def rounds_or_default(self) -> int:
        return self.rounds or (5 if self.quick else 15)

    def decode_rounds_or_default(self) -> int:
        return self.decode_rounds or (3 if self.quick else 5)

    def new_tokens_or_default(self) -> int:
        return self.new_tokens or (16 if self.quick else 64)


def machine() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, torch, and the load when they were taken."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_bench(config: BenchConfig, *, progress=None) -> dict[str, Any]:
    """Measure everything ``config`` asks for; returns the JSON-ready results.

    Args:
        config: what to measure.
        progress: optional ``str -> None`` told what is being measured.

    Returns:
        ``{"config", "machine_before", "machine_after", "kernels", "bandwidth_gbps", "ffn",
        "decode", "expert_size", "balance"}``; ``ffn``, ``decode``, ``expert_size`` and
        ``balance`` are lists of row dicts.

    Raises:
        MoefyError: the C++ kernels cannot run here (the benchmark would time torch twice).
    """
    from moefy.bench.bandwidth import read_bandwidth
    from moefy.bench.ffn import run_ffn_bench
    from moefy.kernels import Backend, get_backend
    from moefy.kernels.backend import check_available

    say = progress or (lambda _message: None)
    check_available(Backend.CPU)
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "machine_before": machine(),
        "kernels": get_backend().value,
        "bandwidth_gbps": {},
        "ffn": [],
        "decode": [],
        "expert_size": [],
        "balance": [],
    }
    previous_threads = torch.get_num_threads()
    decode_models = _decode_models(config, say) if "decode" in config.parts else None
    try:
        for threads in config.thread_counts():
            torch.set_num_threads(threads)
            say(f"{threads} thread(s): read bandwidth")
            bandwidth = read_bandwidth(rounds=config.rounds_or_default())
            results["bandwidth_gbps"][str(threads)] = bandwidth / 1e9
            if "ffn" in config.parts:
                say(f"{threads} thread(s): FFN kernels against dense")
                results["ffn"] += run_ffn_bench(
                    threads=threads, bandwidth=bandwidth, rounds=config.rounds_or_default()
                )
            if "expert-size" in config.parts:
                from moefy.bench.expert_size import run_expert_size_bench

                say(f"{threads} thread(s): expert sizes in the expert kernel against dense")
                results["expert_size"] += run_expert_size_bench(
                    threads=threads, rounds=config.rounds_or_default()
                )
            if decode_models is not None:
                say(f"{threads} thread(s): decoding {config.model}")
                results["decode"] += _decode_rows(config, decode_models, threads)
    finally:
        torch.set_num_threads(previous_threads)
    if "balance" in config.parts:
        from moefy.bench.balance import run_balance_bench

        keep = config.expert_fractions[0] if config.expert_fractions else BALANCE_KEEP
        results["balance"] = run_balance_bench(config.model, config.data, keep, say=say)
    results["machine_after"] = machine()
    return results


def _decode_models(config: BenchConfig, say) -> dict[str, Any]:
    from moefy.bench.variants import (
        carved_copy,
        routed_copy,
        set_fraction,
        sparsified_copy,
        teal_copy,
    )
    from moefy.models.load import load_model

    say(f"loading {config.model} and building its sparse variants")
    dense, tokenizer = load_model(config.model)
    if tokenizer is None:
        raise MoefyError(f"{config.model} has no tokenizer: the decode benchmark needs one")
    models: dict[str, Any] = {"dense": dense}
    before: dict[str, Any] = {}
    if config.expert_fractions:
        routed = routed_copy(dense, config.expert_fractions[0])
        for fraction in config.expert_fractions:
            name = f"experts@{fraction}"
            models[name], before[name] = routed, set_fraction(routed, fraction)
    if config.teal_sparsity > 0:
        say(f"calibrating TEAL at {config.teal_sparsity:.0%} on {config.data}")
        models[f"teal@{1 - config.teal_sparsity}"] = teal_copy(
            dense, tokenizer, config.teal_sparsity, config.data
        )
    for spec in config.methods:
        sparsity = config.teal_sparsity or 0.5
        say(f"calibrating {spec} at {sparsity:.0%} on {config.data}")
        models[f"{spec}@{1 - sparsity:g}"] = sparsified_copy(
            dense, tokenizer, spec, sparsity, config.data
        )
    if config.carved_keep > 0:
        say(f"carving at {config.carved_keep:.0%} of the FFN FLOPs on {config.data}")
        models[f"carved@{config.carved_keep}"] = carved_copy(
            dense, tokenizer, config.carved_keep, config.data
        )
    prompt = tokenizer(DEFAULT_PROMPT, return_tensors="pt").input_ids  # (1, T)
    return {"models": models, "before": before, "prompt": prompt}


def _decode_rows(config: BenchConfig, built: dict[str, Any], threads: int) -> list[dict]:
    from moefy.bench.decode import decode_speeds, speed_rows

    speeds = decode_speeds(
        built["models"],
        built["prompt"],
        config.new_tokens_or_default(),
        rounds=config.decode_rounds_or_default(),
        before=built["before"],
        compiled=config.compile,
    )
    return speed_rows(speeds, threads=threads, step="compiled" if config.compile else "generate")
