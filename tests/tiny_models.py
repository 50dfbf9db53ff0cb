"""Tiny randomly initialised models of every supported architecture, built from config classes.

Shapes are small (D=32, F=64, 2 layers) so a forward pass costs microseconds; weights are random
but seeded. Biases, where an architecture has them, are made non-zero so tests see them.
"""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 128
D, F = 32, 64
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DEC = dict(
    hidden_size=D,
    intermediate_size=F,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    head_dim=8,
    **_IDS,
)

_BUILDERS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DEC, mlp_bias=True)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_DEC)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_DEC)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**_DEC)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_DEC)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**_DEC)),
    "gpt2": lambda: T.GPT2LMHeadModel(
        T.GPT2Config(
            n_embd=D, n_inner=F, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, **_IDS
        )
    ),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(
        T.GPTNeoXConfig(
            hidden_size=D,
            intermediate_size=F,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            **_IDS,
        )
    ),
    "opt": lambda: T.OPTForCausalLM(
        T.OPTConfig(
            hidden_size=D,
            ffn_dim=F,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            word_embed_proj_dim=D,
            max_position_embeddings=128,
            **_IDS,
        )
    ),
    "bert": lambda: T.BertModel(
        T.BertConfig(
            hidden_size=D,
            intermediate_size=F,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            pad_token_id=0,
        )
    ),
    "t5": lambda: T.T5ForConditionalGeneration(
        T.T5Config(
            d_model=D,
            d_ff=F,
            num_layers=2,
            num_heads=4,
            d_kv=8,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
            **_IDS,
        )
    ),
    "t5-gated": lambda: T.T5ForConditionalGeneration(
        T.T5Config(
            d_model=D,
            d_ff=F,
            num_layers=2,
            num_heads=4,
            d_kv=8,
            vocab_size=VOCAB,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
            **_IDS,
        )
    ),
}

ARCH_NAMES = tuple(_BUILDERS)
CAUSAL_ARCH_NAMES = tuple(n for n in ARCH_NAMES if n not in ("bert", "t5", "t5-gated"))


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of architecture ``name`` in eval mode, with non-zero biases."""
    torch.manual_seed(seed)
    model = _BUILDERS[name]()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


def tiny_inputs(name: str, batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs for ``tiny_model(name)``: token ids (and decoder ids for T5)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    if name.startswith("t5"):
        return {"input_ids": ids, "decoder_input_ids": ids[:, : seq // 2]}
    return {"input_ids": ids}


WORDS = (
    "the a of to and in is was for on that with as by at from it be this are have an not market "
    "bank shares film music game team player election minister phone software"
).split(" ")


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A word-level fast tokenizer trained in-process on a few sentences (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = WORDS
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials)
    tok.train_from_iterator([" ".join(words)] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def save_tiny_hf_folder(path, name: str = "llama", seed: int = 0):
    """Save ``tiny_model(name)`` and ``tiny_tokenizer()`` as a local Hugging Face folder."""
    model = tiny_model(name, seed=seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_word_text(path, docs: int = 40, words: int = 60, seed: int = 0):
    """A ``.jsonl`` of ``docs`` documents of ``words`` random words of :data:`WORDS` at ``path``."""
    import json

    gen = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(docs):
        picks = torch.randint(len(WORDS), (words,), generator=gen).tolist()
        lines.append(json.dumps({"text": " ".join(WORDS[i] for i in picks)}))
    path.write_text("\n".join(lines))
    return path


def rewrite_safetensors_header(path, change) -> None:
    """Apply ``change(header_dict)`` to the JSON header of the safetensors file at ``path``,
    keeping its data bytes: a file whose header lies about its tensors."""
    import json
    import struct

    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def grow_first_tensor(header) -> None:
    """A :func:`rewrite_safetensors_header` change: the first tensor claims twice its shape."""
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [dim * 2 for dim in header[name]["shape"]]


def tiny_sweep_setting(root, seed: int = 0):
    """A tiny llama folder and a ``text.jsonl`` of 300 documents of 60 random :data:`WORDS`
    (``random.Random(seed)``) under ``root``: the sweep tests' model and text."""
    import json
    import random

    model = save_tiny_hf_folder(root / "model")
    rng = random.Random(seed)
    text = root / "text.jsonl"
    text.write_text(
        "".join(
            json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(60))}) + "\n"
            for _ in range(300)
        )
    )
    return model, text
