"""moefy.export to GGUF: llama.cpp's qwen2moe names and types, read back with gguf's reader and
loaded with transformers' GGUF loader (same logits as the exported model within the dtype's
tolerance)."""

from __future__ import annotations

import pytest
from export_support import blocks, bpe_tokenizer, carved

import moefy
from moefy.errors import MoefyError
from moefy.export import compare_export
from moefy.export.gguf_file import read_gguf_summary
from moefy.routing import set_routing

# max |logit diff| against the exported fp32 model (logits of a tiny random model are ~0.1-1)
TOLERANCE = {"fp32": 1e-4, "q8_0": 5e-2}


@pytest.mark.parametrize("dtype", ["fp32", "q8_0"])
def test_gguf_loads_back_with_the_exported_logits(tmp_path, dtype) -> None:
    model = carved()
    set_routing(model, "topk", keep=0.5)
    path = tmp_path / "moe.gguf"
    report = moefy.export(
        model, path, format="gguf", dtype=dtype, tokenizer=bpe_tokenizer(), data=blocks(seed=4)
    )
    summary = read_gguf_summary(path)
    assert summary["architecture"] == "qwen2moe"
    assert (summary["expert_count"], summary["expert_used_count"]) == (6, 2)
    tensors = summary["tensors"]
    assert "output.weight" in tensors  # written even when tied: llama.cpp's qwen2moe needs it
    assert tensors["blk.0.ffn_gate_inp.weight"] == "F32"  # the router keeps its precision
    big = "Q8_0" if dtype == "q8_0" else "F32"
    assert tensors["blk.1.ffn_up_exps.weight"] == big
    assert tensors["blk.1.ffn_down_exps.weight"] == ("F16" if dtype == "q8_0" else "F32")
    assert {"blk.0.ffn_gate_inp_shexp.weight", "blk.0.attn_q.bias"} <= set(tensors)
    check = compare_export(model, report, blocks(n=4, seed=5))
    assert check.max_logit_diff < TOLERANCE[dtype]
    assert abs(check.ratio - 1) < 0.03


def test_gguf_needs_a_bpe_tokenizer_and_writes_nothing_without_one(tmp_path) -> None:
    from tiny_models import tiny_tokenizer  # word-level

    with pytest.raises(MoefyError, match="BPE"):
        moefy.export(carved(), tmp_path / "m.gguf", format="gguf", tokenizer=tiny_tokenizer())
    with pytest.raises(MoefyError, match="tokenizer"):
        moefy.export(carved(), tmp_path / "m.gguf", format="gguf")
    assert list(tmp_path.iterdir()) == []


def test_gguf_shared_gate_is_nonzero_and_still_exactly_one_half(tmp_path) -> None:
    """llama.cpp computes the shared gate's sigmoid as silu(z) / z: a zero gate would be NaN."""
    import numpy as np
    import torch
    from gguf import GGUFReader

    from moefy.export.gguf_file import SHARED_GATE_WEIGHT

    model = carved()
    path = tmp_path / "moe.gguf"
    moefy.export(model, path, format="gguf", tokenizer=bpe_tokenizer(), data=blocks(seed=4))
    gates = [t for t in GGUFReader(path).tensors if t.name.endswith("ffn_gate_inp_shexp.weight")]
    assert gates
    for gate in gates:
        weight = np.asarray(gate.data, dtype=np.float32)
        assert (weight == np.float32(SHARED_GATE_WEIGHT)).all()
    # the gate logit of a normalised hidden state (|sum| ~ 1e3 at most) leaves sigmoid at 0.5,
    # and llama.cpp's silu(z) / z form is defined and equal to it
    z = torch.tensor([SHARED_GATE_WEIGHT * s for s in (1e3, -1e3, 1.0, -1e-6)], dtype=torch.float32)
    assert (torch.sigmoid(z) == 0.5).all()
    assert (torch.nn.functional.silu(z) / z == 0.5).all()
