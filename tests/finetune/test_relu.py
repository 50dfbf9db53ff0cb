"""relufy_: only the activation changes, the config says relu, save/load keeps it."""

from __future__ import annotations

import pytest
import torch
import transformers

from moefy.arch.registry import find_ffns
from moefy.errors import MoefyError
from moefy.finetune import FATReLU, reapply_fatrelu, relufy_
from moefy.models.load import load_model
from tiny_models import ARCH_NAMES, tiny_inputs, tiny_model, tiny_tokenizer


def _ffn_relu_reference(model):
    """Hooks that replace each FFN activation output by relu of its input: the expected model."""
    handles = []
    for site in find_ffns(model):
        handles.append(
            site.part("act").register_forward_hook(lambda _m, args, _out: torch.relu(args[0]))
        )
    return handles


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_only_the_activation_changes_and_save_load_keeps_it(name, tmp_path):
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handles = _ffn_relu_reference(model)
    with torch.no_grad():
        expected = model(**inputs)[0]
    for h in handles:
        h.remove()
    assert relufy_(model) == len(find_ffns(model))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(site.part("act"), FATReLU) for site in find_ffns(model))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], expected, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[0], expected, rtol=1e-5, atol=1e-6)


def test_fatrelu_zeroes_up_to_the_threshold_and_load_model_restores_it(tmp_path):
    act = FATReLU(0.5)
    x = torch.tensor([-1.0, 0.0, 0.25, 0.5, 0.75])
    assert act(x).tolist() == [0.0, 0.0, 0.0, 0.0, 0.75]
    model = tiny_model("llama")
    relufy_(model, threshold=0.5)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    assert all(site.part("act").threshold == 0.5 for site in find_ffns(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert reapply_fatrelu(plain) is True


def test_errors():
    with pytest.raises(MoefyError, match=">= 0"):
        relufy_(tiny_model("llama"), threshold=-0.1)
    from moefy.moe import MoEfyConfig, moefy_

    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=4))
    with pytest.raises(MoefyError):
        relufy_(model)
