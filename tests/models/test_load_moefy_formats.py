"""``load_model`` reads the folders moefy's own verbs write (moefied, sparsified)."""

from __future__ import annotations

import torch

from moefy.data.blocks import TokenBlocks
from moefy.models.load import load_model
from moefy.moe import MoEfyConfig, moefy_, save, set_selection
from moefy.sparsify import TopKConfig, save_sparse, sparsify_, sparsify_config_of
from tiny_models import tiny_inputs, tiny_model


def test_moefied_folder_loads_with_identical_outputs(tmp_path):
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    set_selection(model, k=3)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    save(model, tmp_path / "moe")
    loaded, _ = load_model(tmp_path / "moe")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)


def test_sparsified_folder_loads_with_identical_outputs(tmp_path):
    model = tiny_model("llama")
    blocks = TokenBlocks(torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(0)))
    sparsify_(model, TopKConfig(sparsity=0.5), blocks)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    save_sparse(model, tmp_path / "sparse")
    loaded, _ = load_model(tmp_path / "sparse")
    assert sparsify_config_of(loaded) == sparsify_config_of(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
