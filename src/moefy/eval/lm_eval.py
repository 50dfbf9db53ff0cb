"""lm-evaluation-harness on moefy models: wrap a model for ``lm_eval.simple_evaluate``.

lm-eval is an optional extra (``pip install 'moefy[lm-eval]'``). Its Hugging Face wrapper
(``HFLM``) accepts a model object, so a moefied, routed, sparsified or layer-dropped model is
evaluated as it is in memory, with its selections, thresholds and dropped parts in force.

Tasks normally download their data from the Hub. A local task is a YAML file whose
``dataset_path: json`` points at a local JSON-lines file; :func:`run_lm_eval` finds such YAMLs
through ``include_path`` and runs with the Hub switched off, so it works offline.

Example:
    >>> from moefy.eval.lm_eval import lm_eval_model, run_lm_eval
    >>> import lm_eval
    >>> lm = lm_eval_model(model, tokenizer, batch_size=8)
    >>> lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])  # downloads the task's data
    >>> run_lm_eval(model, tokenizer, ["my_local_task"], include_path="tasks/")["results"]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from moefy.errors import MoefyError

INSTALL_HINT = "pip install 'moefy[lm-eval]' (or pip install -r requirements/lm-eval.txt)"


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.models.huggingface
    except ImportError as err:
        raise MoefyError(f"lm-eval is not installed ({err.name} missing): {INSTALL_HINT}") from err
    return lm_eval


def lm_eval_model(model: nn.Module, tokenizer: Any = None, *, batch_size: int = 8) -> Any:
    """An lm-eval model object (``HFLM``) around ``model`` as it is in memory.

    Args:
        model: a causal LM (dense, moefied, routed, sparsified or dropped).
        tokenizer: its tokenizer (required: a model object carries none).
        batch_size: sequences per forward in lm-eval's requests.

    Returns:
        An ``lm_eval.models.huggingface.HFLM`` that ``lm_eval.simple_evaluate(model=...)`` accepts.

    Raises:
        MoefyError: lm-eval missing, no tokenizer, or a model that is not a causal LM.
    """
    from moefy.models.load import is_causal_lm

    _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise MoefyError("lm_eval_model needs the model's tokenizer: load_model returns both")
    if not is_causal_lm(model):
        raise MoefyError(
            f"lm-eval's HF wrapper scores causal LMs; {type(model).__name__} is not one"
        )
    if batch_size < 1:
        raise MoefyError(f"batch_size must be >= 1, got {batch_size}")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    offline: bool = True,
    builtin_tasks: bool = True,
) -> dict[str, Any]:
    """Run lm-eval tasks on ``model`` and return lm-eval's results dict.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        tasks: task names (lm-eval's or those of YAMLs under ``include_path``).
        include_path: a folder of task YAMLs (local tasks), or None.
        limit: examples per task (None: all).
        batch_size: sequences per forward.
        num_fewshot: few-shot examples (None: each task's default).
        offline: switch the Hub off (``HF_DATASETS_OFFLINE``, ``HF_HUB_OFFLINE``) for the run, so
            a task that would download fails fast instead of hanging.
        builtin_tasks: also index lm-eval's own tasks (thousands of YAMLs, about 10 s); False
            keeps only those under ``include_path``.

    Returns:
        lm-eval's dict; ``["results"][task]`` holds the metrics (``"acc,none"`` and so on).
    """
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise MoefyError("run_lm_eval needs at least one task name")
    if include_path is not None and not Path(include_path).is_dir():
        raise MoefyError(f"include_path {include_path} is not a folder of task YAMLs")
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    if offline:
        os.environ.update({k: "1" for k in saved})
    try:
        manager = TaskManager(
            include_path=None if include_path is None else str(include_path),
            include_defaults=builtin_tasks or include_path is None,
        )
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise MoefyError(
                f"unknown lm-eval task(s) {unknown}: check the names or give include_path"
            )
        return lm_eval.simple_evaluate(
            model=lm_eval_model(model, tokenizer, batch_size=batch_size),
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
