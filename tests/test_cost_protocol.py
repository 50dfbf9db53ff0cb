"""The cost protocol: every module moefy swaps in reports its own cost, and eval and bench count
any module that implements the protocol, a new kind included, without knowing its type."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moefy.moe
import moefy.sparsify
from moefy.bench.decode import weight_bytes_per_token
from moefy.cost import MeasuredModule, ModuleCost, reset_counters, swapped_modules, tensor_bytes
from moefy.eval.cost import measure_cost
from moefy.layers import drop_layers_
from moefy.layers.modules import DroppedAttention, DroppedBlock, DroppedMLP
from moefy.moe import MoEfyConfig, moe_layers, moefy_, set_selection
from moefy.sparsify import ThresholdActivation, ThresholdLinear, TopKConfig, TopKLinear, sparsify_
from moefy.sparsify.wrappers import sparse_modules
from tiny_models import D, F, tiny_inputs, tiny_model

LAYERS = 2
# tiny llama (mlp_bias=True), FFN FLOPs per token and layer (see tests/eval/test_cost.py)
DENSE_FFN_LAYER = (2 * D * F + F) * 2 + 2 * F + (2 * F * D + D)


class CountedMLP(nn.Module):
    """A toy swapped module, known to neither eval nor bench: it keeps the MLP it replaced, runs
    it, and claims a fixed cost per token."""

    FLOPS_PER_TOKEN = 1000.0
    BYTES_PER_TOKEN = 7.0

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tokens_seen += x.shape[:-1].numel()
        return self.base_layer(x)

    def measured_cost(self) -> ModuleCost:
        tokens = int(self.tokens_seen)
        return ModuleCost(self.FLOPS_PER_TOKEN * tokens, self.BYTES_PER_TOKEN, tokens)

    def reset_counters(self) -> None:
        self.tokens_seen.zero_()


def _cost(model, name="llama"):
    inputs = tiny_inputs(name)
    with torch.no_grad(), measure_cost(model) as meter:
        model(**inputs)
        meter.add_tokens(inputs["input_ids"].numel())
    return meter.result()


def test_a_new_swapped_module_is_counted_by_eval_and_bench():
    model = tiny_model("llama").eval()
    dense_cost, dense_bytes = _cost(model), weight_bytes_per_token(model)
    mlp = model.model.layers[1].mlp
    model.model.layers[1].mlp = CountedMLP(mlp)
    model(**tiny_inputs("llama"))  # counted before the meter: attach must reset it
    cost = _cost(model)
    assert cost.ffn_flops_per_token == DENSE_FFN_LAYER + CountedMLP.FLOPS_PER_TOKEN
    assert cost.other_flops_per_token == dense_cost.other_flops_per_token
    assert model.model.layers[1].mlp.measured_cost().tokens == cost.tokens
    bytes_now = weight_bytes_per_token(model)
    assert bytes_now == dense_bytes - tensor_bytes(mlp.parameters()) + CountedMLP.BYTES_PER_TOKEN
    reset_counters(model)
    assert model.model.layers[1].mlp.measured_cost().tokens == 0


def _linear_wrappers():
    return [
        ThresholdLinear(nn.Linear(8, 4), layer=0, role="up_proj"),
        TopKLinear(nn.Linear(8, 4), layer=0, role="down_proj", k=2),
    ]


@pytest.mark.parametrize(
    "module",
    [
        *_linear_wrappers(),
        ThresholdActivation(nn.SiLU(), layer=0, role="act_fn", d_model=8, d_ff=16),
        DroppedAttention(0, nn.Linear(8, 8)),
        DroppedMLP(0, None),
        DroppedBlock(0, nn.Linear(8, 8)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_swapped_module_implements_the_protocol(module):
    assert isinstance(module, MeasuredModule)
    module.reset_counters()
    cost = module.measured_cost()
    assert cost.flops == 0 and cost.tokens == 0


def test_moe_layers_report_their_selection():
    model = tiny_model("llama").eval()
    moefy_(model, MoEfyConfig(num_experts=4))
    set_selection(model, k=1)
    moe = moe_layers(model)[0]
    assert isinstance(moe, MeasuredModule)
    assert [path for path, _ in swapped_modules(model)] == [
        "model.layers.0.mlp",
        "model.layers.1.mlp",
    ]
    experts = tensor_bytes([moe.w_in, moe.w_out])
    biases = tensor_bytes([moe.b_in, moe.b_out])
    reset_counters(model)
    assert moe.measured_cost().weight_bytes == experts + biases  # nothing measured: all of it
    x = torch.randn(5, D)
    moe(x)
    cost = moe.measured_cost()
    assert cost.tokens == 5 and cost.flops == pytest.approx(moe.flops_per_token() * 5)
    assert cost.weight_bytes == pytest.approx(experts / 4 + biases)
    assert list(swapped_modules(moe)) == [("", moe)]  # a bare swapped module is its own root


def test_sparse_linear_reports_dense_flops_less_the_skipped_weights():
    layer = TopKLinear(nn.Linear(8, 4), layer=0, role="down_proj", k=2)
    layer(torch.randn(3, 8))
    cost = layer.measured_cost()
    dense = 3 * (2 * 8 * 4 + 4)
    skipped = 3 * (8 - 2) * 4  # six zeroed inputs per token, each skips a column of 4 weights
    assert cost.flops == dense - 2 * skipped and cost.tokens == 3
    assert cost.weight_bytes == pytest.approx(tensor_bytes(layer.base_layer.parameters()) / 4)


def test_dropped_layers_cost_nothing_even_with_their_weights_kept():
    kept, freed = tiny_model("llama").eval(), tiny_model("llama").eval()
    drop_layers_(kept, mlp=[1], keep_weights=True)
    drop_layers_(freed, mlp=[1], keep_weights=False)
    cost = _cost(kept)
    assert cost.ffn_flops_per_token == DENSE_FFN_LAYER
    assert weight_bytes_per_token(kept) == weight_bytes_per_token(freed)


def test_former_reset_names_still_reset():
    model = tiny_model("llama").eval()
    sparsify_(model, TopKConfig(sparsity=0.5))
    model(**tiny_inputs("llama"))
    wrappers = [w for _, w in sparse_modules(model)]
    assert all(int(w.tokens_seen) > 0 for w in wrappers)
    moefy.sparsify.reset_counters(model)
    assert all(int(w.tokens_seen) == 0 for w in wrappers)
    assert moefy.moe.reset_tally is reset_counters
    moe = tiny_model("llama")
    moefy_(moe, MoEfyConfig(num_experts=4))
    layer = moe_layers(moe)[0]
    layer(torch.randn(2, D))
    layer.reset_tally()
    assert int(layer.tokens_seen) == 0
