"""End-to-end decode speed of a Llama-shaped model with random weights: dense against TEAL-style
threshold sparsity and against the MoE FFN, every variant decoded the same way.

Speed depends only on shapes, dtype and the share of weights read, not on what the weights
are, so a model of Llama-3-8B's shapes (or SmolLM2-135M's) with random weights measures what a
trained one of those shapes would; quality is measured on real models elsewhere, and the
results say so. Every variant decodes through :class:`moefy.decoding.StaticDecoder` (static KV
cache, ``torch.compile``d step: CUDA graphs on a GPU), all timed round-robin in the same rounds
by :func:`moefy.bench.decode.decode_speeds`; the limit beside each figure is dense's weight bytes
per token over the variant's (measured shares).

Variants: ``dense``; ``teal`` at each sparsity (inputs of every attention and MLP projection,
one threshold per layer, calibrated on random tokens; the thresholds of each target are swapped
into one sparsified copy before its rounds); ``experts`` at each share of experts (64 random
experts per FFN, centroid routers; the top-k is set before its rounds).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moefy.bench.report import Report, Table, decode_table_row
from moefy.device import DTYPES
from moefy.errors import MoefyError
from moefy.jsonconfig import JsonConfig

# Shapes of real models (transformers LlamaConfig fields); "tiny" is for tests.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "tie_word_embeddings": True,
    },
}
CALIBRATION_BLOCKS = 8
CALIBRATION_LEN = 128
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class DecodeBenchConfig(JsonConfig):
    """What the end-to-end decode benchmark measures.

    Attributes:
        shape: ``llama3-8b``, ``smollm2-135m`` (or ``tiny``, for tests).
        layers: decoder layers (default the shape's own: 32 / 30).
        dtype: weight dtype, ``bf16``, ``fp16`` or ``fp32``.
        teal_sparsities: TEAL targets (share of projection inputs zeroed).
        expert_fractions: shares of experts the MoE variants run.
        num_experts: experts per FFN of the MoE variants.
        prompt_tokens: random prompt length.
        new_tokens: tokens per timed decode (default 64, quick 16).
        rounds: timed decodes per variant and length (default 5, quick 3).
        quick: the shorter defaults.
        compile: decode through the compiled step (False: the same loop eagerly).
        seed: random weights and tokens.
    """

    shape: str = "llama3-8b"
    layers: int | None = None
    dtype: str = "bf16"
    teal_sparsities: tuple[float, ...] = (0.4, 0.5)
    expert_fractions: tuple[float, ...] = (0.5, 0.25)
    num_experts: int = 64
    prompt_tokens: int = 16
    new_tokens: int | None = None
    rounds: int | None = None
    quick: bool = False
    compile: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shape not in MODEL_SHAPES:
            raise MoefyError(
                f"unknown model shape {self.shape!r}: use one of {sorted(MODEL_SHAPES)}"
            )
        if self.dtype not in DTYPES:
            raise MoefyError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.layers is not None and self.layers < 1:
            raise MoefyError(f"layers must be >= 1, got {self.layers}")
        if any(not 0.0 < s < 1.0 for s in self.teal_sparsities):
            raise MoefyError(f"TEAL sparsities must be in (0, 1), got {self.teal_sparsities}")
        if any(not 0.0 < f <= 1.0 for f in self.expert_fractions):
            raise MoefyError(f"expert fractions must be in (0, 1], got {self.expert_fractions}")
        if self.new_tokens is not None and self.new_tokens < 2:
            raise MoefyError(f"new_tokens must be >= 2 to time decoding, got {self.new_tokens}")
        if self.rounds is not None and self.rounds < 1:
            raise MoefyError(f"rounds must be >= 1, got {self.rounds}")
        if self.prompt_tokens < 1:
            raise MoefyError(f"prompt_tokens must be >= 1, got {self.prompt_tokens}")

    def new_tokens_or_default(self) -> int:
        return self.new_tokens or (16 if self.quick else 64)

    def rounds_or_default(self) -> int:
        return self.rounds or (3 if self.quick else 5)


def random_model(config: DecodeBenchConfig, device: torch.device) -> nn.Module:
    """A LlamaForCausalLM of ``config.shape`` with N(0, 0.02) weights, on ``device``, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(MODEL_SHAPES[config.shape])
    if config.layers is not None:
        fields["num_hidden_layers"] = config.layers
    model_config = LlamaConfig(**fields, max_position_embeddings=4096)
    torch.manual_seed(config.seed)
    with torch.device(device):
        model = LlamaForCausalLM(model_config).to(DTYPES[config.dtype])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, WEIGHT_STD)
    return model.eval()


def _random_blocks(config: DecodeBenchConfig, device: torch.device):
    from moefy.data.blocks import TokenBlocks

    vocab = MODEL_SHAPES[config.shape]["vocab_size"]
    gen = torch.Generator().manual_seed(config.seed + 1)
    ids = torch.randint(0, vocab, (CALIBRATION_BLOCKS, CALIBRATION_LEN), generator=gen)
    return TokenBlocks(ids.to(device))


def _teal_variants(
    dense: nn.Module, config: DecodeBenchConfig, device: torch.device
) -> tuple[nn.Module, dict[str, Callable[[], None]]]:
    """One TEAL copy and, per target, a call that loads that target's thresholds into it."""
    from moefy.sparsify import TEALConfig, sparsify_, unsparsify
    from moefy.sparsify.wrappers import sparse_modules

    teal = copy.deepcopy(dense)
    blocks = _random_blocks(config, device)
    thresholds: dict[float, dict[str, torch.Tensor]] = {}
    calibration = None
    for index, sparsity in enumerate(config.teal_sparsities):
        method = TEALConfig(
            sparsity=sparsity,
            attention=True,
            greedy=False,
            min_calibration_tokens=1,
            calibration_passes=1,
        )
        report = sparsify_(teal, method, blocks, calibration=calibration)
        calibration = report.calibration
        thresholds[sparsity] = {
            name: module.threshold.clone() for name, module in sparse_modules(teal)
        }
        if index + 1 < len(config.teal_sparsities):
            unsparsify(teal)
    wrappers = dict(sparse_modules(teal))

    def loader(sparsity: float) -> Callable[[], None]:
        def load() -> None:
            for name, value in thresholds[sparsity].items():
                wrappers[name].threshold.copy_(value)

        return load

    return teal.eval(), {f"teal@{1 - s:g}": loader(s) for s in config.teal_sparsities}


def _expert_variants(
    dense: nn.Module, config: DecodeBenchConfig
) -> tuple[nn.Module, dict[str, Callable[[], None]]]:
    """One moefied copy with centroid routers and, per share, a call that sets its top-k."""
    from moefy.bench.variants import set_fraction
    from moefy.moe import MoEfyConfig, moefy_
    from moefy.routing import attach_routers

    moe = copy.deepcopy(dense)
    moefy_(moe, MoEfyConfig(num_experts=config.num_experts, method="random"))
    attach_routers(moe, "centroid", fraction=config.expert_fractions[0])
    return moe.eval(), {f"experts@{f:g}": set_fraction(moe, f) for f in config.expert_fractions}


def run_decode_bench(
    config: DecodeBenchConfig, *, device: torch.device, progress=None
) -> dict[str, Any]:
    """Decode tokens per second of every variant, timed in the same rounds.

    Args:
        config: what to measure.
        device: where to run (``cuda`` for the GPU figures; ``cpu`` works too, for tests).
        progress: optional ``str -> None`` told what is being done.

    Returns:
        ``{"config", "device", "note", "decode": [rows]}``; rows as
        :func:`moefy.bench.decode.speed_rows` (``threads`` 0; ``active``: 1 - sparsity, or the
        share of experts).
    """
    from moefy.bench.decode import decode_speeds, speed_rows

    say = progress or (lambda _message: None)
    say(f"building a random {config.shape}-shaped model ({config.dtype})")
    dense = random_model(config, device)
    models: dict[str, nn.Module] = {"dense": dense}
    before: dict[str, Callable[[], None]] = {}
    if config.teal_sparsities:
        say("calibrating TEAL thresholds")
        teal, loaders = _teal_variants(dense, config, device)
        for name, load in loaders.items():
            models[name], before[name] = teal, load
    if config.expert_fractions:
        say(f"splitting every FFN into {config.num_experts} experts")
        moe, setters = _expert_variants(dense, config)
        for name, set_k in setters.items():
            models[name], before[name] = moe, set_k
    vocab = MODEL_SHAPES[config.shape]["vocab_size"]
    gen = torch.Generator().manual_seed(config.seed + 2)
    prompt = torch.randint(0, vocab, (1, config.prompt_tokens), generator=gen).to(device)
    say("compiling and timing every variant" if config.compile else "timing every variant")
    speeds = decode_speeds(
        models,
        prompt,
        config.new_tokens_or_default(),
        rounds=config.rounds_or_default(),
        before=before,
        compiled=config.compile,
    )
    # host threads do not apply to GPU rows: 0, as in the GPU kernel bench
    step = "compiled" if config.compile else "eager"
    rows = speed_rows(speeds, threads=0, step=step)
    return {
        "config": config.to_dict(),
        "device": str(device),
        "note": f"random weights of {config.shape}'s shapes: speed only, no quality",
        "decode": rows,
    }


def decode_report(results: dict[str, Any]) -> Report:
    """The table of :func:`run_decode_bench`.

    Args:
        results: what :func:`run_decode_bench` returned.

    Returns:
        One :class:`moefy.bench.report.Table` in a list (``moefy bench --device cuda`` prints it).
    """
    config = results["config"]
    step = "compiled static-cache step" if config["compile"] else "eager static-cache loop"
    return [
        Table(
            f"decode on {results['device']}, {config['shape']} shapes, {config['dtype']}, {step} "
            f"({results['note']}; limit = dense bytes / variant bytes per token)",
            [decode_table_row(row, threads=False) for row in results["decode"]],
        )
    ]
