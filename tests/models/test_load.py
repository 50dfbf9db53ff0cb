"""Offline model loading: local Hugging Face folders, the shipped models, and user errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from moefy.errors import MoefyError
from moefy.models import load
from moefy.models.load import BUILTIN_MODELS, cache_dir, is_causal_lm, load_model
from tiny_models import CAUSAL_ARCH_NAMES, VOCAB, tiny_inputs, tiny_model

SPECIAL_TOKENS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}


def _tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary ("w4" -> 4); it has no pad token."""
    vocab = SPECIAL_TOKENS | {f"w{i}": i for i in range(len(SPECIAL_TOKENS), VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize(
    ("arch", "class_name"),
    [
        ("llama", "LlamaForCausalLM"),
        ("gpt2", "GPT2LMHeadModel"),
        ("opt", "OPTForCausalLM"),
        ("bert", "BertModel"),
        ("t5", "T5ForConditionalGeneration"),
    ],
)
def test_saved_folder_loads_back_with_the_same_outputs(tmp_path, arch, class_name):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path)
    assert type(loaded).__name__ == class_name
    assert not loaded.training
    assert tokenizer is None  # the folder holds no tokenizer files
    inputs = tiny_inputs(arch)
    torch.testing.assert_close(_outputs(loaded, inputs), _outputs(model, inputs), rtol=0, atol=0)


def test_folder_without_architectures_picks_the_class_from_the_model_type(tmp_path):
    for arch, class_name in (("llama", "LlamaForCausalLM"), ("bert", "BertModel")):
        folder = tmp_path / arch
        tiny_model(arch).save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        del config["architectures"]
        (folder / "config.json").write_text(json.dumps(config))
        assert type(load_model(folder)[0]).__name__ == class_name


def test_tokenizer_is_loaded_and_gets_a_pad_token(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    _, tokenizer = load_model(str(tmp_path))
    assert tokenizer("w5 w6 zz", add_special_tokens=False)["input_ids"] == [5, 6, 3]
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 2


def test_dtype_is_applied(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(MoefyError, match="floating torch dtype"):
        load_model(tmp_path, dtype=torch.int8)


def test_missing_folder_and_hub_id_errors(tmp_path):
    with pytest.raises(MoefyError, match="never downloads.*hf download meta-llama/Llama-3.2-1B"):
        load_model("meta-llama/Llama-3.2-1B")
    with pytest.raises(MoefyError, match="no such model folder"):
        load_model(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(MoefyError, match="no such model folder.*smollm2-135m, minilm-l6"):
        load_model("smollm3")


def test_folder_without_config_is_not_a_model_folder(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(MoefyError, match=r"is not a Hugging Face model folder \(no config.json\)"):
        load_model(tmp_path)
    with pytest.raises(MoefyError, match="not a Hugging Face model folder"):
        load_model(tmp_path / "weights.bin")


def test_is_causal_lm():
    for arch in CAUSAL_ARCH_NAMES:
        assert is_causal_lm(tiny_model(arch)), arch
    for arch in ("bert", "t5"):
        assert not is_causal_lm(tiny_model(arch)), arch
    assert not is_causal_lm(torch.nn.Linear(2, 2))


def _sentence_embeddings(model, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, D)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # (B, D)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_minilm_loads_and_embeds_sentences_sensibly():
    model, tokenizer = load_model("minilm-l6")
    assert type(model).__name__ == "BertModel"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    emb = _sentence_embeddings(
        model,
        tokenizer,
        ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell."],
    )
    similar, unrelated = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    assert similar > 0.6 and unrelated < 0.2, (similar, unrelated)


def test_builtin_names():
    assert BUILTIN_MODELS == ("smollm2-135m", "minilm-l6")


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEFY_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("MOEFY_CACHE")
    assert cache_dir().name == "moefy"


@pytest.mark.slow
def test_smollm2_is_converted_once_then_read_from_the_cache(monkeypatch):
    # The default cache, so the ~20 s conversion happens once per machine, not once per run.
    model, tokenizer = load_model("smollm2-135m")
    folder = cache_dir() / "models" / "smollm2-135m"
    weights = folder / "model.safetensors"
    assert weights.is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    stamp = os.stat(weights)

    def refuse(_folder):
        raise AssertionError("converted again although the cache exists")

    monkeypatch.setattr(load, "_convert_smollm2", refuse)
    again, _ = load_model("smollm2-135m")
    after = os.stat(weights)
    assert (after.st_ino, after.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)

    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    logits = _outputs(again, dict(input_ids=inputs.input_ids))
    torch.testing.assert_close(logits, _outputs(model, dict(input_ids=inputs.input_ids)))
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"
