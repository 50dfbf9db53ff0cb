"""``sweep``: every method at every level on the same evaluation, cached, then the report.

The dense model is evaluated first; its log-probabilities are the reference of the agreement
measures and its FFN FLOPs the denominator of every ``ffn_flops_fraction``. Each (method, level)
result lands in the cache as soon as it is done, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from moefy.errors import MoefyError, check_config
from moefy.eval.config import EvalConfig
from moefy.jsonconfig import JsonConfig, is_number
from moefy.sweep.cache import SweepCache, cache_key, folder_stamp
from moefy.sweep.methods import ROUTED_METHODS, SweepContext, get_method

CONFIG_VERSION = 1
DENSE = "dense"
REPORT_FILE = "report.html"
ROWS_FILE = "rows.json"


@dataclass(frozen=True)
class SweepConfig(JsonConfig):
    """What a sweep evaluates.

    Attributes:
        model: the dense model (a name or folder ``load_model`` takes).
        methods: method names (see :func:`moefy.sweep.method_names`); ``dense`` is always added.
        levels: shared levels (keep: share of the FFN kept) for methods that take them; empty
            means each method's defaults.
        method_levels: per-method levels that override ``levels``.
        eval: the evaluation config every method is scored with.
        calibration_tokens: calibration tokens for methods that calibrate.
        moe: folder of a moefied model, or None to split with ``params`` on the fly.
        routed: folder of a moefied model with trained routers.
        carved: folder of a carved model (``moefy convert --shared ... --router``) for the
            ``moe-carved`` methods, or None to carve the dense model on the calibration text.
        profile: a profile folder whose plots go into the report, or None.
        experts: experts per layer for an on-the-fly split.
        device: where every model runs (``auto``: CUDA when present, else the CPU; ``cpu``,
            ``cuda``; see :func:`moefy.device.resolve_device`).
        dtype: dtype of every model's weights (``auto``, ``fp32``, ``bf16``, ``fp16``; ``auto``
            is bf16 on CUDA, fp32 on the CPU). A device or dtype other than the defaults is part
            of the cache key.
        version: config format version.
    """

    model: str = "smollm2-135m"
    methods: tuple[str, ...] = (DENSE, "moe-oracle", "teal")
    levels: tuple[float, ...] = ()
    method_levels: dict[str, tuple[float, ...]] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(tasks=("perplexity", "agreement")))
    calibration_tokens: int = 8192
    moe: str | None = None
    routed: str | None = None
    carved: str | None = None
    profile: str | None = None
    experts: int = 64
    device: str = "auto"
    dtype: str = "auto"
    version: int = CONFIG_VERSION

    VERSION: ClassVar[int] = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.check_version()
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
        self._check_plan()
        folders = {
            "moe": self.moe,
            "routed": self.routed,
            "carved": self.carved,
            "profile": self.profile,
        }
        for option, folder in folders.items():
            if folder is not None and not Path(folder).is_dir():
                raise MoefyError(f"--{option} {folder} is not a folder ({option}= in Python)")
        self._check_folder_kinds()
        self._check_layer_levels()

    def _check_folder_kinds(self) -> None:
        """``moe`` and ``routed`` are moefied models and ``profile`` a profile, checked by
        their files before any model loads (a dense folder would fail after the dense pass)."""
        from moefy.moe.serialize import MOEFY_CONFIG_FILE
        from moefy.profiling.result import ARRAYS_FILE, SUMMARY_FILE

        made_by = {
            "moe": "moefy convert",
            "routed": "moefy train-routers",
            "carved": "moefy convert --shared ... --router analytic",
        }
        for option, maker in made_by.items():
            folder = getattr(self, option)
            if folder is not None and not (Path(folder) / MOEFY_CONFIG_FILE).is_file():
                raise MoefyError(
                    f"--{option} {folder} is not a moefied model (no {MOEFY_CONFIG_FILE}): give "
                    f"a folder made by {maker} ({option}= in Python)"
                )
        if self.profile is not None:
            files = (SUMMARY_FILE, ARRAYS_FILE)
            missing = [name for name in files if not (Path(self.profile) / name).is_file()]
            if missing:
                raise MoefyError(
                    f"--profile {self.profile} is not a moefy profile (no {' or '.join(missing)}): "
                    "give a folder made by moefy profile (profile= in Python)"
                )

    def _check_layer_levels(self) -> None:
        """Layer levels against the model's layer count, read from its config.json alone (a
        level too large would otherwise fail only after the dense evaluation)."""
        layer_pairs = [
            (method, level)
            for method, level in self.plan()
            if method != DENSE and get_method(method).family == "layers"
        ]
        if not layer_pairs:
            return
        from moefy.models.load import read_model_config

        hf_config = read_model_config(self.model)
        num_layers = getattr(hf_config, "num_hidden_layers", None)
        if not isinstance(num_layers, int):
            return  # not known before loading: the layer method checks it then
        for method, level in layer_pairs:
            kept = _layers_kept(method)
            if level is not None and level > num_layers - kept:
                given = f"--level {method}={level:g}"
                if method not in self.method_levels:
                    given = f"{method}'s default level {level:g} (give --level {method}=LEVELS)"
                keeps = f" and {method} keeps {kept} of them" if kept else ""
                raise MoefyError(f"{given}: the model has {num_layers} layers{keeps}")

    def _check_plan(self) -> None:
        """Every level in range for its method and every method listed once, before any model
        is loaded (a bad level would otherwise fail only after the dense evaluation)."""
        repeated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if repeated:
            raise MoefyError(f"methods listed more than once: {', '.join(repeated)}")
        for levels in (self.levels, *self.method_levels.values()):
            if not isinstance(levels, (tuple, list)) or not all(map(is_number, levels)):
                raise MoefyError(f"levels must be a sequence of numbers, got {levels!r}")
        if self.method_levels.get(DENSE):
            raise MoefyError("dense takes no levels: drop dense from --level")
        if self.levels and not any(get_method(m).uses_shared_levels for m in self.methods):
            raise MoefyError(
                "--levels apply to none of the methods (each is a keep, a share of the FFN "
                "kept): give each method's levels with --level METHOD=LEVELS"
            )
        for name, levels in self.method_levels.items():
            if name != DENSE and not levels:
                raise MoefyError(f"no levels given for {name}: --level {name}=LEVEL,LEVEL")
        pairs = self.plan()
        repeated_pairs = [p for i, p in enumerate(pairs) if p in pairs[:i]]
        if repeated_pairs:
            method, level = repeated_pairs[0]
            raise MoefyError(f"{method} level {level:g} is listed more than once")
        for method, level in pairs:
            check = get_method(method).check_level
            if method != DENSE and check is not None:
                check(level)

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


def _layers_kept(method: str) -> int:
    """Blocks a layer method always keeps (skip keeps the first and last), from its entry in
    :data:`moefy.layers.LAYER_METHODS`; 0 for a sweep method that is not registered there."""
    from moefy.layers import LAYER_METHODS

    if method not in LAYER_METHODS:
        return 0
    return int(LAYER_METHODS.get(method).meta.get("kept", 0))


def _key_parts(config: SweepConfig, method: str, level: float | None) -> dict[str, Any]:
    parts: dict[str, Any] = {
        "method": method,
        "level": level,
        "model": folder_stamp(config.model),
        "eval": config.eval.to_dict(),
    }
    entry = get_method(method)
    if entry.calibrates:
        parts["calibration_tokens"] = config.calibration_tokens
    if method.startswith("moe-carved"):  # its own model: the other moe folders do not count
        parts["carved"] = folder_stamp(config.carved)
    elif entry.family == "moe":
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
    overwrite: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """Evaluate every method at every level of ``config``; write rows and ``report.html``.

    An existing sweep folder is resumed (its cache answers what it holds); ``overwrite`` starts
    it afresh (the old folder comes back if the run fails). A folder moefy did not write is
    refused before anything runs.

    Args:
        config: the sweep.
        out: the sweep folder (cache, ``rows.json``, ``report.html``).
        progress: show progress bars over the dense evaluation and the threshold methods'
            calibration.
        report: write the HTML report.
        overwrite: discard what an earlier sweep left in ``out``.
        on_row: called with each row evaluated in this run (not the cached ones), on rank 0,
            as soon as it is done; ``moefy sweep`` prints a line per row with it.

    Returns:
        A :class:`SweepResult`.

    Example:
        >>> result = sweep(SweepConfig(methods=("moe-oracle", "teal"), levels=(0.5, 0.25)),
        ...                "runs/sweep", on_row=lambda row: print(row["method"], row["level"]))
        >>> result.report
        PosixPath('runs/sweep/report.html')
    """
    import contextlib

    from moefy import dist
    from moefy.io import FOLDER, check_output, working_folder

    check_config(config, SweepConfig)
    out = check_output(out, FOLDER, overwrite=overwrite, resume=True)
    main = dist.is_main_process()
    folder = working_folder(out, overwrite=overwrite) if main else contextlib.nullcontext(out)
    with folder:
        dist.barrier()  # the other ranks read the cache only once rank 0 has set the folder up
        return _sweep(config, out, progress=progress, report=report, on_row=on_row)


@dataclass
class _Records:
    """The (method, level) records of one sweep: the cached ones, then each new one as it is
    done (cached at once on rank 0, so an interrupted sweep resumes where it stopped)."""

    cache: SweepCache
    keys: dict[tuple[str, float | None], str]
    on_row: Callable[[dict[str, Any]], None] | None
    main: bool
    found: dict[tuple[str, float | None], dict[str, Any]] = field(default_factory=dict)

    def read_cache(self) -> None:
        for pair, key in self.keys.items():
            cached = self.cache.get(pair[0], pair[1], key)
            if cached is not None:
                self.found[pair] = cached

    def add(self, pair: tuple[str, float | None], record: dict[str, Any], *, shown: bool) -> None:
        self.found[pair] = record
        if self.main:
            self.cache.put(pair[0], pair[1], self.keys[pair], record)
            if shown and self.on_row is not None:
                self.on_row(record["row"])


def _sweep(
    config: SweepConfig,
    out: Path,
    *,
    progress: bool,
    report: bool,
    on_row: Callable[[dict[str, Any]], None] | None,
) -> SweepResult:
    from moefy import dist
    from moefy.io import write_json

    out = Path(out)
    plan = config.plan()
    keys = {pair: cache_key(_key_parts(config, *pair)) for pair in plan}
    main = dist.is_main_process()
    records = _Records(SweepCache(out), keys, on_row, main)
    records.read_cache()
    todo = [pair for pair in plan if pair not in records.found]
    computed = len(todo)
    if todo:
        _evaluate_missing(config, todo, records, progress=progress)
    rows = _rows_with_ratios([records.found[pair]["row"] for pair in plan])
    report_path = None
    if main:
        write_json(out / ROWS_FILE, rows)
        if report:
            from moefy.sweep.report import write_report

            report_path = write_report(rows, out / REPORT_FILE, config=config, overwrite=True)
    return SweepResult(rows=rows, folder=out, report=report_path, computed=computed)


@dataclass
class _Evaluation:
    """What every evaluation of one sweep run shares: text, tokenizer, the dense reference."""

    tokenizer: Any
    blocks: Any
    calibration: Any
    reference: Any
    reference_cost: Any


def _evaluate_missing(
    config: SweepConfig,
    todo: list[tuple[str, float | None]],
    records: _Records,
    *,
    progress: bool,
) -> None:
    """Evaluate the ``todo`` pairs (dense first, when it is among them) into ``records``."""
    from moefy import dist

    device, dtype = config.resolved()
    shared = _prepare_evaluation(config, todo, records, progress=progress)
    todo = [pair for pair in todo if pair != (DENSE, None)]
    context = SweepContext(
        model=config.model,
        calibration=shared.calibration,
        moe=config.moe,
        routed=config.routed,
        carved=config.carved,
        experts=config.experts,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    for method, level in _calibration_order(todo):
        records.add(
            (method, level), _evaluate_method(config, context, shared, method, level), shown=True
        )
        dist.barrier()


def _prepare_evaluation(
    config: SweepConfig,
    todo: list[tuple[str, float | None]],
    records: _Records,
    *,
    progress: bool,
) -> _Evaluation:
    """Load the text and the dense model, take its reference log-probabilities and evaluate it
    (unless cached); the dense model is freed before the methods run."""
    from moefy.data.text import load_text
    from moefy.eval.agreement import dense_reference
    from moefy.eval.cost import Cost
    from moefy.eval.harness import evaluate, evaluation_blocks
    from moefy.models.load import load_model

    device, dtype = config.resolved()
    text = load_text(config.eval.data)  # a bad --data fails before the model loads
    dense, tokenizer = load_model(config.model, dtype=dtype, device=device)
    blocks = evaluation_blocks(tokenizer, config.eval)
    needs_calibration = any(get_method(m).calibrates for m, _ in todo)
    calibration = (
        text.blocks(tokenizer, "calibration", config.eval.block_len, config.calibration_tokens)
        if needs_calibration
        else None
    )
    _check_calibration_text(todo, calibration)  # before the dense pass, not after it
    reference = None
    if "agreement" in config.eval.tasks:
        reference = dense_reference(
            dense, blocks, config.eval.agreement_tokens, config.eval.batch_size
        )
    if (DENSE, None) in records.found:
        reference_cost = Cost(**_cost_fields(records.found[(DENSE, None)]["report"]["cost"]))
    else:
        dense_report = evaluate(
            dense, config.eval, tokenizer, reference=reference, blocks=blocks, progress=progress
        )
        reference_cost = dense_report.cost
        records.add((DENSE, None), _record(DENSE, None, dense_report, 0.0), shown=False)
    if reference is not None:
        reference.cost = reference_cost
    del dense
    return _Evaluation(tokenizer, blocks, calibration, reference, reference_cost)


def _evaluate_method(
    config: SweepConfig,
    context: SweepContext,
    shared: _Evaluation,
    method: str,
    level: float | None,
) -> dict[str, Any]:
    """Prepare one method at one level and evaluate it; its record."""
    from moefy.eval.harness import evaluate

    start = time.perf_counter()
    model = get_method(method).prepare(context, level)
    prepared = time.perf_counter() - start
    try:
        result = evaluate(
            model, config.eval, shared.tokenizer, reference=shared.reference, blocks=shared.blocks
        )
    except MoefyError as err:  # a nan perplexity: say which method and level gave it
        at = "" if level is None else f" at level {level:g}"
        raise MoefyError(f"{method}{at}: {err}") from None
    if shared.reference is None:  # no agreement task: the FLOPs fraction still needs dense cost
        result = dataclasses.replace(result, dense_cost=shared.reference_cost)
    extra = {}
    if get_method(method).family == "threshold":
        from moefy.sparsify import measured_sparsity

        # share of the targeted weights skipped on the evaluation text (counters since
        # the cost meter reset them at the start of evaluate)
        extra["measured_sparsity"] = measured_sparsity(model).total
    return _record(method, level, result, prepared, extra)


def _calibration_order(todo: list[tuple[str, float | None]]) -> list[tuple[str, float | None]]:
    """``todo`` with each threshold method's levels sparsest first (keep ascending), so
    its greedy search runs once and the other levels reuse it; other methods keep their order."""
    first = {method: i for i, (method, _) in reversed(list(enumerate(todo)))}

    def key(pair: tuple[str, float | None]) -> tuple[int, float]:
        method, level = pair
        threshold = get_method(method).family == "threshold" and level is not None
        return first[method], (level if threshold else 0.0)

    return sorted(todo, key=key)


def _cost_fields(cost: dict[str, Any]) -> dict[str, Any]:
    fields = {
        k: cost[k]
        for k in (
            "ffn_flops_per_token",
            "other_flops_per_token",
            "weight_bytes_per_token",
            "tokens",
        )
    }
    # rows cached by an older moefy lack it: the linear_flops_fraction is then left out
    fields["attention_flops_per_token"] = cost.get("attention_flops_per_token", 0.0)
    return fields


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
        row["ffn_flops_fraction"] = row["linear_flops_fraction"] = 1.0
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


# Text fields of a sweep row; every other value is a number or None.
_ROW_TEXT_FIELDS = ("method", "family", "level_meaning")


def read_rows(folder: str | Path) -> list[dict[str, Any]]:
    """The rows a sweep wrote to ``folder/rows.json``, checked before anything uses them.

    Args:
        folder: a sweep folder (made by :func:`sweep`).

    Returns:
        The rows, one dict per (method, level).

    Raises:
        MoefyError: no rows file, or one that is not a sweep's table (bad JSON, wrong types,
            missing fields); the message names the file and the first problem.

    Example:
        >>> rows = read_rows("runs/sweep")
        >>> rows[0]["method"]
        'dense'
    """
    import json

    folder = Path(folder)
    rows_file = folder / ROWS_FILE
    if not rows_file.is_file():
        raise MoefyError(f"{rows_file} not found: run moefy sweep --out {folder} first")
    try:
        rows = json.loads(rows_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        problem = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise MoefyError(_not_a_table(rows_file, problem)) from None
    problem = _rows_problem(rows)
    if problem is not None:
        raise MoefyError(_not_a_table(rows_file, problem))
    return rows


def _not_a_table(rows_file: Path, problem: str) -> str:
    return f"{rows_file} is not a moefy sweep table ({problem}): run moefy sweep again"


def _rows_problem(rows: Any) -> str | None:
    """What makes ``rows`` unlike the rows :func:`sweep` writes, or None."""
    if not isinstance(rows, list):
        return f"a list of rows expected, found {_json_type(rows)}"
    if not rows:
        return "no rows"
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"row {index} is {_json_type(row)}, not an object"
        for key in ("method", "level"):
            if key not in row:
                return f"row {index} has no {key!r}"
        for key, value in row.items():
            if key in _ROW_TEXT_FIELDS:
                if not isinstance(value, str):
                    return f"row {index}: {key!r} is {_json_type(value)}, not a string"
            elif value is not None and not is_number(value):
                return f"row {index}: {key!r} is {_json_type(value)}, not a number"
    return None


def _json_type(value: Any) -> str:
    """How JSON would call ``value``'s type: a string, a list, null, ..."""
    if value is None:
        return "null"
    names = {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), "a number")


def _check_calibration_text(todo: list[tuple[str, float | None]], calibration: Any) -> None:
    """Refuse too little calibration text for any threshold method still to run."""
    from moefy.sparsify import check_calibration_text
    from moefy.sweep.methods import threshold_config

    for method in sorted({m for m, _ in todo if get_method(m).family == "threshold"}):
        config = threshold_config(method, 0.5)
        check_calibration_text(
            config, calibration, option="--calibration-tokens; calibration_tokens= in Python"
        )
