"""The verb ``export``: a moefied model written in a format serving engines load.

Formats are entries of :data:`EXPORT_FORMATS` (one :func:`register_export_format` call each):

- ``hf``: a transformers Qwen2-MoE folder (``config.json``, ``model.safetensors`` in the
  per-expert layout of the Hub's Qwen MoE checkpoints, tokenizer, generation config) that
  ``AutoModelForCausalLM.from_pretrained`` loads with neither moefy nor ``trust_remote_code``;
- ``gguf``: one GGUF file with llama.cpp's ``qwen2moe`` tensor names and metadata.

Both start from the same in-memory Qwen2-MoE model (:mod:`moefy.export.qwen2_moe`, routers from
:mod:`moefy.export.routing`), so a GGUF file and an hf folder of one model hold the same numbers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.io import FILE, FOLDER, atomic_path, check_output
from moefy.registry import Registry

if TYPE_CHECKING:
    from moefy.data.blocks import TokenBlocks
    from moefy.export.routing import RouterFit

__all__ = [
    "EXPORT_FORMATS",
    "ExportFormat",
    "ExportReport",
    "build_export_model",
    "export",
    "register_export_format",
]

# the record of an export inside an hf folder
EXPORT_RECORD = "moefy_export.json"
_HF_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExportFormat:
    """How one format is written.

    Attributes:
        write: ``write(qwen_model, tokenizer, temp_path, dtype, record)``: the temporary path is
            renamed onto the output when it returns.
        kind: ``"folder"`` or ``"file"`` (the output policy of :mod:`moefy.io`).
        dtypes: the dtype names it takes, the first the default.
    """

    write: Callable[..., None]
    kind: str
    dtypes: tuple[str, ...]


EXPORT_FORMATS: Registry[ExportFormat] = Registry("export format")


def register_export_format(name: str, fmt: ExportFormat, *, help: str) -> ExportFormat:  # noqa: A002
    """Register an export format under ``name`` (the CLI's ``--format`` choices read it).

    Example:
        >>> register_export_format("hf", ExportFormat(_write_hf, "folder", ("fp32",)), help="...")
    """
    return EXPORT_FORMATS.register(name, fmt, help=help)


@dataclass
class ExportReport:
    """What :func:`export` wrote.

    Attributes:
        path: the output folder or file.
        format: the format name.
        dtype: the stored dtype.
        num_experts: routed experts per layer (E_r).
        experts_per_token: routed experts each token runs (k).
        shared_size: width of the shared expert.
        dense_layers: layers kept dense.
        router: the router fit (recall and weight error per layer).
        exported: the exported model in memory (fp32, hf: in the stored dtype), for checks.
    """

    path: Path
    format: str
    dtype: str
    num_experts: int
    experts_per_token: int
    shared_size: int
    dense_layers: list[int] = field(default_factory=list)
    router: RouterFit | None = None
    exported: nn.Module | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (the fit's numbers, not its weights)."""
        router = self.router
        return {
            "format": self.format,
            "dtype": self.dtype,
            "architecture": "Qwen2MoeForCausalLM",
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "shared_expert_intermediate_size": self.shared_size,
            "dense_layers": self.dense_layers,
            "router_target": None if router is None else router.target,
            "router_fit_tokens": 0 if router is None else router.n_tokens,
            "router_recall": None if router is None else [f.recall for f in router.layers],
            "router_weight_error": None
            if router is None
            else [f.weight_error for f in router.layers],
        }


def resolve_format(format: str, dtype: str | None = None) -> tuple[ExportFormat, str]:  # noqa: A002
    """The registered format ``format`` and the dtype it stores (its first when None).

    Raises:
        MoefyError: an unknown format (with a close match), a dtype the format does not store.

    Example:
        >>> resolve_format("gguf", "q8_0")[1]
        'q8_0'
    """
    fmt = EXPORT_FORMATS.get(format).value
    dtype = fmt.dtypes[0] if dtype is None else dtype
    if dtype not in fmt.dtypes:
        raise MoefyError(f"format {format!r} stores {', '.join(fmt.dtypes)}, not {dtype!r}")
    return fmt, dtype


def build_export_model(
    model: nn.Module,
    data: TokenBlocks | None = None,
    *,
    target: str = "router",
    batch_size: int = 8,
    logit_spread: float | None = None,
) -> tuple[nn.Module, Any, RouterFit]:
    """The Qwen2-MoE model (fp32, CPU) equivalent to ``model``, with its routers fitted.

    Args:
        model: a moefied Llama / Mistral / Qwen2 model with one top-k for every layer.
        data: calibration blocks for the router fit (None when every expert runs).
        target: ``router`` (distil the model's selector) or ``oracle`` (true expert norms).
        batch_size: blocks per forward pass of the fit.
        logit_spread: per-token rms of the exported router logits (default
            :data:`moefy.export.routing.DEFAULT_LOGIT_SPREAD`); see :func:`export`.

    Returns:
        ``(qwen_model, plan, router_fit)``.

    Example:
        >>> qwen, plan, fit = build_export_model(model, blocks)
    """
    from moefy.export.qwen2_moe import build_qwen2_moe, plan_export
    from moefy.export.routing import DEFAULT_LOGIT_SPREAD, fit_routers

    plan = plan_export(model)
    spread = DEFAULT_LOGIT_SPREAD if logit_spread is None else logit_spread
    fit = fit_routers(model, plan, data, target=target, batch_size=batch_size, logit_spread=spread)
    return build_qwen2_moe(model, plan, fit.weights()), plan, fit


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "hf",  # noqa: A002 - the word users know
    tokenizer: Any = None,
    data: TokenBlocks | None = None,
    dtype: str | None = None,
    target: str = "router",
    overwrite: bool = False,
    batch_size: int = 8,
    logit_spread: float | None = None,
) -> ExportReport:
    """Write a moefied model as a standard MoE checkpoint (see :data:`EXPORT_FORMATS`).

    The routing the model runs now is what is exported: its top-k (one for every layer; set it
    with :func:`moefy.routing.set_routing`) and a linear router distilled from its selector.

    Args:
        model: a moefied Llama / Mistral / Qwen2 model.
        path: the output folder (``hf``) or file (``gguf``); nothing is left there on failure.
        format: a name in :data:`EXPORT_FORMATS`.
        tokenizer: the model's tokenizer (written with an hf folder; GGUF needs it).
        data: calibration blocks for the router fit; not needed when every expert runs.
        dtype: stored dtype (``fp32``, ``fp16``, ``bf16``; GGUF also ``q8_0``); default fp32.
        target: ``router`` or ``oracle``: what the exported router imitates.
        overwrite: replace an output moefy wrote before.
        batch_size: blocks per forward pass of the fit.
        logit_spread: per-token rms of the exported router logits (default 1e-3). The
            softmax weights stray from the 1/E_r folded into the experts by about the
            spread, and the top-k boundary's gaps grow with it: a trade-off between the
            weights' fidelity and the selection's robustness to another engine's rounding
            (docs/serving.md has what it measured on SmolLM2's carved export).

    Returns:
        An :class:`ExportReport`.

    Raises:
        MoefyError: an unknown format or dtype, a refused output path, a model without a
            Qwen2-MoE counterpart (see :func:`moefy.export.qwen2_moe.plan_export`), routing
            to fit without data, GGUF without a tokenizer.

    Example:
        >>> set_routing(model, keep=0.25)
        >>> moefy.export(model, "runs/moe-hf", tokenizer=tokenizer, data=blocks)
        >>> AutoModelForCausalLM.from_pretrained("runs/moe-hf")
    """
    fmt, dtype = resolve_format(format, dtype)
    check_output(path, fmt.kind, overwrite=overwrite, option="output")  # before any work
    qwen, plan, fit = build_export_model(
        model, data, target=target, batch_size=batch_size, logit_spread=logit_spread
    )
    report = ExportReport(
        path=Path(path),
        format=format,
        dtype=dtype,
        num_experts=plan.num_experts,
        experts_per_token=plan.experts_per_token,
        shared_size=plan.shared_size,
        dense_layers=plan.dense_layers,
        router=fit,
        exported=qwen,
    )
    with atomic_path(path, fmt.kind, overwrite=overwrite) as tmp:
        fmt.write(qwen, tokenizer, tmp, dtype, report.to_dict())
    return report


def _write_hf(qwen: nn.Module, tokenizer: Any, tmp: Path, dtype: str, record: dict) -> None:
    """The transformers folder: weights, config, tokenizer, generation config, the record."""
    import json

    qwen.to(_HF_DTYPES[dtype])
    qwen.config.dtype = _HF_DTYPES[dtype]
    qwen.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _write_gguf(qwen: nn.Module, tokenizer: Any, tmp: Path, dtype: str, record: dict) -> None:
    from moefy.export.gguf_file import write_gguf

    if tokenizer is None:
        raise MoefyError("a GGUF file carries its tokenizer: pass the model's tokenizer")
    write_gguf(qwen, tokenizer, tmp, dtype)


register_export_format(
    "hf",
    ExportFormat(_write_hf, FOLDER, ("fp32", "bf16", "fp16")),
    help="transformers Qwen2-MoE folder (AutoModelForCausalLM, vLLM)",
)
register_export_format(
    "gguf",
    ExportFormat(_write_gguf, FILE, ("fp32", "fp16", "bf16", "q8_0")),
    help="one GGUF file, llama.cpp's qwen2moe",
)
