"""Check an export: load what was written with plain transformers and compare it with moefy's
model on the same evaluation tokens.

Shape legend:
    B: blocks, T: tokens per block, V: vocabulary
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moefy.errors import MoefyError

if TYPE_CHECKING:
    from moefy.data.blocks import TokenBlocks
    from moefy.export.api import ExportReport

__all__ = ["ExportCheck", "compare_export", "load_exported"]

# Blocks whose logits the GGUF check compares with the exported model's.
_LOGIT_BLOCKS = 2


@dataclass
class ExportCheck:
    """Perplexity of moefy's model and of the export loaded back, on the same tokens.

    Attributes:
        moefy_perplexity: moefy's routed model.
        exported_perplexity: the export, loaded with plain transformers.
        n_tokens: predicted tokens.
        max_logit_diff: GGUF only: largest |logit difference| between the file loaded with
            transformers' GGUF loader and the exported model in memory (None for hf).
    """

    moefy_perplexity: float
    exported_perplexity: float
    n_tokens: int
    max_logit_diff: float | None = None

    @property
    def ratio(self) -> float:
        """exported / moefy perplexity."""
        return self.exported_perplexity / self.moefy_perplexity


def load_exported(report: ExportReport) -> nn.Module:
    """What :func:`moefy.export` wrote, loaded with plain transformers (fp32, CPU, eval).

    ``hf``: ``AutoModelForCausalLM.from_pretrained(folder)``. ``gguf``: transformers' GGUF
    loader, given the exported config (its GGUF config reader does not read the expert widths,
    ``expert_feed_forward_length``, that llama.cpp reads).

    Example:
        >>> qwen = load_exported(moefy.export(model, "runs/moe-hf", data=blocks))
    """
    import transformers

    options: dict[str, Any] = {"dtype": torch.float32, "local_files_only": True}
    if report.format == "gguf":
        if report.exported is None:
            raise MoefyError("the GGUF check needs the export's config: export in this process")
        folder, options["gguf_file"] = report.path.parent, report.path.name
        options["config"] = report.exported.config
    else:
        folder = report.path
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **options).eval()


def compare_export(
    model: nn.Module, report: ExportReport, data: TokenBlocks, *, batch_size: int = 8
) -> ExportCheck:
    """Perplexity of ``model`` and of its export (loaded back) on ``data``.

    Args:
        model: the moefied model that was exported, with the same routing.
        report: what :func:`moefy.export` returned.
        data: evaluation blocks.
        batch_size: blocks per forward pass.

    Returns:
        An :class:`ExportCheck`.

    Example:
        >>> check = compare_export(model, report, eval_blocks)
        >>> f"{check.ratio:.3f}"
        '1.004'
    """
    from moefy.eval.perplexity import perplexity

    ours = perplexity(model, data, batch_size=batch_size)
    loaded = load_exported(report)
    theirs = perplexity(loaded, data, batch_size=batch_size)
    diff = None
    if report.format == "gguf" and report.exported is not None:
        ids = data.input_ids[:_LOGIT_BLOCKS]  # (B, T)
        with torch.no_grad():
            reference = report.exported.float()(input_ids=ids).logits  # (B, T, V)
            diff = float((loaded(input_ids=ids).logits - reference).abs().max())
    return ExportCheck(
        moefy_perplexity=ours.perplexity,
        exported_perplexity=theirs.perplexity,
        n_tokens=ours.n_tokens,
        max_logit_diff=diff,
    )
