"""``sweep``: every method at every level on the same evaluation, cached, then the report.

The dense model is evaluated first; its log-probabilities are the reference of the agreement
measures and its FFN FLOPs the denominator of every ``ffn_flops_fraction``. Each (method, level)
result lands in the cache as soon as it is done, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moefy.errors import MoefyError
from moefy.eval.config import EvalConfig
from moefy.sweep.cache import SweepCache, cache_key, folder_stamp
from moefy.sweep.methods import ROUTED_METHODS, SweepContext, get_method

DENSE = "dense"
REPORT_FILE = "report.html"
ROWS_FILE = "rows.json"


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep evaluates.

    Attributes:
        model: the dense model (a name or folder ``load_model`` takes).
        methods: method names (see :func:`moefy.sweep.method_names`); ``dense`` is always added.
        levels: shared levels (kept share of the FFN) for methods that take them; empty means
            each method's defaults.
        method_levels: per-method levels that override ``levels``.
        eval: the evaluation config every method is scored with.
        calibration_tokens: calibration tokens for methods that calibrate.
        moe: folder of a moefied model, or None to split with ``params`` on the fly.
        routed: folder of a moefied model with trained routers.
        profile: a profile folder whose plots go into the report, or None.
        experts: experts per layer for an on-the-fly split.
        device: where every model runs (``auto``: CUDA when present, else the CPU; ``cpu``,
            ``cuda``; see :func:`moefy.device.resolve_device`).
        dtype: dtype of every model's weights (``auto``, ``fp32``, ``bf16``, ``fp16``; ``auto``
            is bf16 on CUDA, fp32 on the CPU). A device or dtype other than the defaults is part
            of the cache key.
    """

    model: str = "smollm2-135m"
    methods: tuple[str, ...] = (DENSE, "moe-oracle", "teal")
    levels: tuple[float, ...] = ()
    method_levels: dict[str, tuple[float, ...]] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(tasks=("perplexity", "agreement")))
    calibration_tokens: int = 8192
    moe: str | None = None
    routed: str | None = None
    profile: str | None = None
    experts: int = 64
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        self.resolved()  # a one-line error for an unknown device or dtype, or CUDA without one
        if not self.methods:
            raise MoefyError("a sweep needs at least one method")
        for name in self.methods:
            get_method(name)  # a one-line error for unknown names
        routed = [m for m in self.methods if m in ROUTED_METHODS]
        if routed and self.routed is None:
            raise MoefyError(
                f"{', '.join(routed)} need a model with trained routers: pass --routed (a folder "
                "made by moefy train-routers)"
            )
        unknown = sorted(set(self.method_levels) - set(self.methods))
        if unknown:
            raise MoefyError(f"levels given for {unknown}, which are not among the methods")
        if self.calibration_tokens < 1:
            raise MoefyError(f"calibration_tokens must be >= 1, got {self.calibration_tokens}")

    def plan(self) -> list[tuple[str, float | None]]:
        """The (method, level) pairs to evaluate, dense first."""
        pairs: list[tuple[str, float | None]] = [(DENSE, None)]
        for name in self.methods:
            if name == DENSE:
                continue
            method = get_method(name)
            if name in self.method_levels:
                levels = self.method_levels[name]
            elif self.levels and method.uses_shared_levels:
                levels = self.levels
            else:
                levels = method.default_levels
            pairs.extend((name, float(level)) for level in levels)
        return pairs

    def resolved(self) -> tuple[Any, Any]:
        """``(torch.device, torch.dtype)`` of :attr:`device` and :attr:`dtype` on this machine."""
        from moefy.device import resolve

        return resolve(self.device, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["eval"] = self.eval.to_dict()
        return data


@dataclass(frozen=True)
class SweepResult:
    """The rows of a sweep and where its files are.

    Attributes:
        rows: one flat dict per (method, level), dense first.
        folder: the sweep folder.
        report: path of ``report.html`` (None if not written).
        computed: how many (method, level) pairs were evaluated in this run (0: all cached).
    """

    rows: list[dict[str, Any]]
    folder: Path
    report: Path | None
    computed: int


def _key_parts(config: SweepConfig, method: str, level: float | None) -> dict[str, Any]:
    parts: dict[str, Any] = {
        "method": method,
        "level": level,
        "model": folder_stamp(config.model),
        "eval": config.eval.to_dict(),
    }
    family = get_method(method).family
    if family in ("threshold", "layers"):
        parts["calibration_tokens"] = config.calibration_tokens
    if family == "moe":
        parts["moe"] = folder_stamp(config.moe)
        parts["routed"] = folder_stamp(config.routed)
        parts["experts"] = config.experts if config.moe is None else None
    from moefy.device import dtype_name

    device, dtype = config.resolved()
    # added only when not the defaults, so caches written before devices existed stay valid
    if device.type != "cpu":
        parts["device"] = device.type
    if dtype_name(dtype) != "fp32":
        parts["dtype"] = dtype_name(dtype)
    return parts


def sweep(
    config: SweepConfig,
    out: str | Path,
    *,
    progress: bool = False,
    report: bool = True,
) -> SweepResult:
    """Evaluate every method at every level of ``config``; write rows and ``report.html``.

    Args:
        config: the sweep.
        out: the sweep folder (cache, ``rows.json``, ``report.html``).
        progress: show progress bars and a line per evaluation.
        report: write the HTML report.

    Returns:
        A :class:`SweepResult`.

    Example:
        >>> result = sweep(SweepConfig(methods=("moe-oracle", "teal"), levels=(0.5, 0.25)),
        ...                "runs/sweep")
        >>> result.report
        PosixPath('runs/sweep/report.html')
    """
    from moefy import dist
    from moefy.data.text import load_text
    from moefy.eval.agreement import dense_reference
    from moefy.eval.cost import Cost
    from moefy.eval.harness import evaluate, evaluation_blocks
    from moefy.io import write_json
    from moefy.models.load import load_model

    out = Path(out)
    cache = SweepCache(out)
    plan = config.plan()
    keys = {pair: cache_key(_key_parts(config, *pair)) for pair in plan}
    records: dict[tuple[str, float | None], dict[str, Any]] = {}
    for pair in plan:
        cached = cache.get(pair[0], pair[1], keys[pair])
        if cached is not None:
            records[pair] = cached
    todo = [pair for pair in plan if pair not in records]
    computed = len(todo)
    main = dist.is_main_process()
    if todo:
        device, dtype = config.resolved()
        dense, tokenizer = load_model(config.model, dtype=dtype, device=device)
        blocks = evaluation_blocks(tokenizer, config.eval)
        needs_calibration = any(get_method(m).family in ("threshold", "layers") for m, _ in todo)
        calibration = (
            load_text(config.eval.data).blocks(
                tokenizer, "calibration", config.eval.block_len, config.calibration_tokens
            )
            if needs_calibration
            else None
        )
        _check_calibration_text(todo, calibration)  # before the dense pass, not after it
        reference = None
        if "agreement" in config.eval.tasks:
            reference = dense_reference(
                dense, blocks, config.eval.agreement_tokens, config.eval.batch_size
            )
        if (DENSE, None) in records:
            reference_cost = Cost(**_cost_fields(records[(DENSE, None)]["report"]["cost"]))
        else:
            dense_report = evaluate(
                dense, config.eval, tokenizer, reference=reference, blocks=blocks, progress=progress
            )
            reference_cost = dense_report.cost
            records[(DENSE, None)] = _record(DENSE, None, dense_report, 0.0)
            if main:
                cache.put(DENSE, None, keys[(DENSE, None)], records[(DENSE, None)])
            todo.remove((DENSE, None))
        if reference is not None:
            reference.cost = reference_cost
        del dense
        context = SweepContext(
            model=config.model,
            calibration=calibration,
            moe=config.moe,
            routed=config.routed,
            experts=config.experts,
            device=device,
            dtype=dtype,
        )
        for method, level in _calibration_order(todo):
            start = time.perf_counter()
            model = get_method(method).prepare(context, level)
            prepared = time.perf_counter() - start
            result = evaluate(
                model, config.eval, tokenizer, reference=reference, blocks=blocks, progress=False
            )
            if reference is None:  # no agreement task: the FLOPs fraction still needs dense cost
                result = dataclasses.replace(result, dense_cost=reference_cost)
            extra = {}
            if get_method(method).family == "threshold":
                from moefy.sparsify import measured_sparsity

                # share of the targeted weights skipped on the evaluation text (counters since
                # the cost meter reset them at the start of evaluate)
                extra["measured_sparsity"] = measured_sparsity(model).total
            records[(method, level)] = _record(method, level, result, prepared, extra)
            if main:
                cache.put(method, level, keys[(method, level)], records[(method, level)])
                if progress:
                    _print_progress(records[(method, level)]["row"])
            del model
            dist.barrier()
    rows = _rows_with_ratios([records[pair]["row"] for pair in plan])
    report_path = None
    if main:
        write_json(out / ROWS_FILE, rows)
        if report:
            from moefy.sweep.report import write_report

            report_path = write_report(rows, out / REPORT_FILE, config=config)
    return SweepResult(rows=rows, folder=out, report=report_path, computed=computed)


def _calibration_order(todo: list[tuple[str, float | None]]) -> list[tuple[str, float | None]]:
    """``todo`` with each threshold method's levels sparsest first (kept share ascending), so
    its greedy search runs once and the other levels reuse it; other methods keep their order."""
    first = {method: i for i, (method, _) in reversed(list(enumerate(todo)))}

    def key(pair: tuple[str, float | None]) -> tuple[int, float]:
        method, level = pair
        threshold = get_method(method).family == "threshold" and level is not None
        return first[method], (level if threshold else 0.0)

    return sorted(todo, key=key)


def _cost_fields(cost: dict[str, Any]) -> dict[str, Any]:
    return {
        k: cost[k]
        for k in (
            "ffn_flops_per_token",
            "other_flops_per_token",
            "weight_bytes_per_token",
            "tokens",
        )
    }


def _record(
    method: str,
    level: float | None,
    report: Any,
    prepare_seconds: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec = get_method(method)
    row = {
        "method": method,
        "family": spec.family,
        "level": level,
        "level_meaning": spec.level_meaning,
        **report.row(),
        **(extra or {}),
        "seconds": report.seconds + prepare_seconds,
    }
    if method == DENSE:
        row["ffn_flops_fraction"] = 1.0
    return {"row": row, "report": report.to_dict()}


def _rows_with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``perplexity_ratio`` (to dense) to every row that has a perplexity."""
    dense = next((r for r in rows if r["method"] == DENSE), None)
    base = None if dense is None else dense.get("perplexity")
    out = []
    for row in rows:
        row = dict(row)
        if base and row.get("perplexity") is not None:
            row["perplexity_ratio"] = row["perplexity"] / base
        out.append(row)
    return out


def _print_progress(row: dict[str, Any]) -> None:
    from moefy.cli.show import console

    level = "" if row["level"] is None else f" {row['level']:g}"
    flops = row.get("ffn_flops_fraction")
    ppl = row.get("perplexity")
    console().print(
        f"  {row['method']}{level}: FFN FLOPs "
        f"{'n/a' if flops is None else f'{flops:.1%}'}, perplexity "
        f"{'n/a' if ppl is None else f'{ppl:.2f}'} ({row['seconds']:.0f} s)"
    )


def _check_calibration_text(todo: list[tuple[str, float | None]], calibration: Any) -> None:
    """Refuse too little calibration text for any threshold method still to run."""
    from moefy.sparsify import check_calibration_text, config_from_dict

    for method in sorted({m for m, _ in todo if get_method(m).family == "threshold"}):
        config = config_from_dict({"method": method, "sparsity": 0.5})
        check_calibration_text(config, calibration, option="--calibration-tokens")
