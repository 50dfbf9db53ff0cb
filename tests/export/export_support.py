"""Fixtures of the export tests: tiny carved Llama models (no FFN biases) and a BPE tokenizer."""

from __future__ import annotations

import torch
import transformers as T

from moefy.carve import CarveConfig, carve_
from moefy.data.blocks import TokenBlocks
from tiny_models import _DEC, VOCAB, WORDS

EXPERT_SIZE, SHARED = 8, 0.25  # d_ff 64: 8 experts of 8 neurons, 2 shared, 6 routed


def tiny_llama(seed: int = 0, **config) -> T.LlamaForCausalLM:
    """A tiny Llama without FFN biases (Qwen2-MoE experts have none), tied embeddings."""
    torch.manual_seed(seed)
    settings = {**_DEC, "tie_word_embeddings": True, **config}
    return T.LlamaForCausalLM(T.LlamaConfig(**settings)).eval()


def blocks(n: int = 16, length: int = 32, seed: int = 0) -> TokenBlocks:
    gen = torch.Generator().manual_seed(seed)
    return TokenBlocks(torch.randint(3, VOCAB, (n, length), generator=gen))


def carved(model=None, **config):
    """``model`` (default a tiny Llama) carved with a ridge router, every expert running."""
    model = tiny_llama() if model is None else model
    settings = {"expert_size": EXPERT_SIZE, "shared": SHARED, "pattern_tokens": 64, **config}
    carve_(model, blocks(seed=1), CarveConfig(**settings))
    return model


def bpe_tokenizer(vocab_size: int = VOCAB):
    """A BPE fast tokenizer trained in-process (GGUF's gpt2 tokenizer is a BPE)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer=trainer)
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def token_ids() -> torch.Tensor:
    """(2, 12) token ids to compare logits on."""
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
