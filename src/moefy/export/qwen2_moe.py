"""A moefied Llama / Mistral / Qwen2 model as a standard transformers Qwen2-MoE model.

Shape legend:
    D: model width, E: experts of a moefy layer, E_r: its routed experts (``E - num_shared``),
    S: slots per expert, S_max: the largest S over layers (``moe_intermediate_size``),
    F_sh: shared-expert width (``shared_expert_intermediate_size``), V: vocabulary

The mapping, per decoder layer:

- attention, norms, embeddings and LM head: copied by name (the module paths are the same);
  absent q/k/v biases become zeros (Qwen2-MoE attention always has them; a zero bias is exact).
- a moefied FFN: its routed experts become the Qwen2-MoE experts (``gate_up_proj`` (E_r, 2S, D)
  is moefy's ``w_in`` as it is: gate rows then up rows; ``down_proj`` (E_r, D, S) is ``w_out``
  transposed, times E_r, see below); its shared experts become the one shared expert (their
  slots side by side, F_sh wide), whose sigmoid gate has zero weights, so it gives exactly 0.5,
  and 2 is folded into the shared down projection. The router is given (:mod:`.routing`).
- a dense FFN (a layer moefy_ left dense): a plain MLP, listed in ``mlp_only_layers``.

Qwen2-MoE weights each routed expert by its softmax probability over all E_r experts
(``norm_topk_prob`` False: llama.cpp's qwen2moe never renormalises, so the same setting means
the same thing in transformers, vLLM and llama.cpp). The router's logits are scaled so small
that every probability is ~1/E_r, and E_r is folded into the experts' down projections: the
weighted sum is moefy's unweighted one up to the small spread the router keeps (measured by
:class:`moefy.export.routing.RouterFit`). Experts narrower than S_max and shared experts
narrower than F_sh are padded with zero neurons (``act(0) * 0 = 0``: exact).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moefy.errors import MoefyError

__all__ = ["ExportPlan", "LayerPlan", "SOURCE_TYPES", "build_qwen2_moe", "plan_export"]

# Source model_type -> what the export must add: the decoders whose modules carry the same
# names as Qwen2-MoE's (self_attn.{q,k,v,o}_proj, input/post_attention_layernorm, model.norm).
SOURCE_TYPES = {
    "llama": "Llama: zero q/k/v biases are added",
    "mistral": "Mistral: zero q/k/v biases are added (no sliding window shorter than context)",
    "qwen2": "Qwen2: q/k/v biases copied",
}
# Probe points of the activation check: zero and both signs from 1e-6 to 10 (a FATReLU
# threshold anywhere in that range changes some output).
_ACT_MAGNITUDES = torch.logspace(-6, 1, 113)
_ACT_PROBE = torch.cat([-_ACT_MAGNITUDES.flip(0), torch.zeros(1), _ACT_MAGNITUDES])
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class LayerPlan:
    """One decoder layer's FFN as the export sees it.

    Attributes:
        index: the layer index.
        moe: the :class:`moefy.moe.MoEFFN`, or None for a dense FFN.
        routed_k: routed experts each token runs (``num_selected - num_shared``), or None.
    """

    index: int
    moe: Any = None
    routed_k: int | None = None

    @property
    def routed(self) -> int:
        """E_r of a moefied layer."""
        return self.moe.num_experts - self.moe.num_shared

    def selects_all(self) -> bool:
        """Every routed expert runs: the router has nothing to choose."""
        return self.routed_k == self.routed


@dataclass
class ExportPlan:
    """What :func:`plan_export` found a model to be, ready for :func:`build_qwen2_moe`.

    Attributes:
        layers: one :class:`LayerPlan` per decoder layer.
        hidden_act: the FFN activation's transformers name.
        num_experts: E_r, the same in every moefied layer.
        experts_per_token: the routed k, the same in every moefied layer.
        expert_size: S_max.
        shared_size: F_sh (at least 1: one zero neuron where no layer has shared experts).
    """

    layers: list[LayerPlan] = field(default_factory=list)
    hidden_act: str = "silu"
    num_experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0
    shared_size: int = 1

    @property
    def moe_layers(self) -> list[LayerPlan]:
        """The moefied layers."""
        return [layer for layer in self.layers if layer.moe is not None]

    @property
    def dense_layers(self) -> list[int]:
        """Indices of the layers that stay dense (``mlp_only_layers``)."""
        return [layer.index for layer in self.layers if layer.moe is None]


def plan_export(model: nn.Module) -> ExportPlan:
    """Check that ``model`` has a Qwen2-MoE counterpart and read its layers.

    Args:
        model: a moefied Llama / Mistral / Qwen2 causal LM.

    Returns:
        An :class:`ExportPlan`.

    Raises:
        MoefyError: another architecture, a model that is not moefied, dropped layers, FFN or
            attention-output biases, a non-gated FFN, an activation transformers cannot name,
            a sliding window, a dynamic-k rule, or layers that differ in routed experts or k.

    Example:
        >>> plan = plan_export(model)
        >>> plan.num_experts, plan.experts_per_token
        (168, 42)
    """
    from moefy.moe.convert import moe_layers

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SOURCE_TYPES:
        raise MoefyError(
            f"no standard MoE counterpart for {model_type!r} models: the export writes "
            f"Qwen2-MoE from {', '.join(SOURCE_TYPES)} only"
        )
    moes = moe_layers(model)
    if not moes:
        raise MoefyError(
            "the model is not moefied: convert it first (moefy convert, carve_ or moefy_)"
        )
    _check_not_dropped(model)
    _check_attention(config)
    by_index = {moe.layer_index: moe for moe in moes}
    layers = [LayerPlan(i, by_index.get(i)) for i in range(config.num_hidden_layers)]
    for layer in layers:
        if layer.moe is not None:
            layer.routed_k = _routed_k(layer.moe)
    plan = ExportPlan(layers=layers, hidden_act=_activation_name(model, moes))
    _fill_sizes(plan)
    return plan


def _check_not_dropped(model: nn.Module) -> None:
    from moefy.layers import dropped_layers

    dropped = dropped_layers(model)
    if not dropped.is_empty:
        raise MoefyError(
            "the model has dropped layers (attention "
            f"{list(dropped.attention)}, MLP {list(dropped.mlp)}, blocks {list(dropped.blocks)}): "
            "Qwen2-MoE has no skipped sublayers; export a model without drop_layers_"
        )


def _check_attention(config: Any) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim * heads != config.hidden_size:
        raise MoefyError(
            f"head_dim {head_dim} x {heads} heads != hidden size {config.hidden_size}: vLLM "
            "and llama.cpp derive Qwen2-MoE's head size from the hidden size"
        )
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None)
    if uses_window and window is not None and window < config.max_position_embeddings:
        raise MoefyError(
            f"sliding-window attention (window {window} < context "
            f"{config.max_position_embeddings}) has no Qwen2-MoE counterpart every engine reads"
        )


def _routed_k(moe: Any) -> int:
    from moefy.moe.selectors import TOPK

    rule = getattr(moe.selector, "rule", TOPK)
    if rule != TOPK:
        raise MoefyError(
            f"layer {moe.layer_index} selects by the {rule} rule: Qwen2-MoE runs a fixed top-k; "
            "set_routing(model, 'topk', keep=...) first"
        )
    if not moe.gated:
        raise MoefyError(f"layer {moe.layer_index} is not a gated FFN: Qwen2-MoE experts are")
    for name in ("b_in", "b_out"):
        bias = getattr(moe, name)
        if bias is not None and bool(bias.detach().ne(0).any()):
            raise MoefyError(f"layer {moe.layer_index} has FFN biases: Qwen2-MoE experts have none")
    return moe.selector.num_selected() - moe.num_shared


def _activation_name(model: nn.Module, moes: list[Any]) -> str:
    """The transformers name of the FFN activation, checked against the modules' outputs."""
    from transformers.activations import ACT2FN

    config = model.config
    name = getattr(config, "hidden_act", None)
    if not isinstance(name, str) or name not in ACT2FN:
        raise MoefyError(f"activation {name!r} has no transformers name Qwen2-MoE can use")
    reference = ACT2FN[name](_ACT_PROBE)
    for moe in moes:
        with torch.no_grad():
            got = moe.act(_ACT_PROBE.to(moe.w_in.device)).cpu()
        if not torch.allclose(got, reference, atol=1e-6):
            raise MoefyError(
                f"layer {moe.layer_index}'s activation {type(moe.act).__name__} is not "
                f"config.hidden_act={name!r} (a FATReLU threshold?): no standard config says it"
            )
    return name


def _fill_sizes(plan: ExportPlan) -> None:
    layers = plan.moe_layers
    routed = {layer.routed for layer in layers}
    ks = {layer.routed_k for layer in layers}
    if len(routed) > 1:
        raise MoefyError(
            f"the moefied layers have different numbers of routed experts ({sorted(routed)}): "
            "Qwen2-MoE has one num_experts; split with a fixed --shared rule"
        )
    if len(ks) > 1:
        raise MoefyError(
            f"the layers run different numbers of routed experts ({sorted(ks)}): Qwen2-MoE has "
            "one num_experts_per_tok; set one share first (--keep, or set_routing(model, "
            "keep=...))"
        )
    plan.num_experts, plan.experts_per_token = routed.pop(), ks.pop()
    plan.expert_size = max(layer.moe.expert_size for layer in layers)
    shared = [int((layer.moe.perm[: layer.moe.num_shared] >= 0).sum()) for layer in layers]
    plan.shared_size = max([1, *shared])


def build_qwen2_moe(
    model: nn.Module, plan: ExportPlan, routers: dict[int, torch.Tensor]
) -> nn.Module:
    """The Qwen2-MoE model (float32, CPU) that computes what ``model`` does.

    Args:
        model: the moefied model :func:`plan_export` read.
        plan: its plan.
        routers: layer index -> (E_r, D) router weight (scaled logits; zeros where every
            expert runs).

    Returns:
        A ``transformers.Qwen2MoeForCausalLM`` in eval mode.

    Raises:
        MoefyError: a tensor of ``model`` the mapping does not consume (a sparsify wrapper, an
            attention-output bias...), named.
    """
    import transformers

    config = qwen2_moe_config(model.config, plan)
    source = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    target = transformers.Qwen2MoeForCausalLM(config).eval()
    wanted = target.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for layer in plan.layers:
        prefix = f"model.layers.{layer.index}.mlp."
        consumed = [k for k in source if k.startswith(prefix)]
        if layer.moe is None:
            tensors.update(_dense_mlp(source, prefix))
        else:
            tensors.update(_moe_block(layer, plan, prefix, routers[layer.index]))
        for key in consumed:
            del source[key]
    for key in list(source):
        if key in wanted:
            tensors[key] = source.pop(key)
    _add_zero_biases(tensors, wanted)
    leftover = sorted(source)
    if leftover:
        raise MoefyError(
            f"{leftover[0]} (and {len(leftover) - 1} more tensors) have no Qwen2-MoE counterpart "
            "(a sparsified layer, an attention-output bias?): export a moefied model only"
        )
    missing = sorted(set(wanted) - set(tensors) - {"lm_head.weight"})
    if missing:
        raise MoefyError(f"the model lacks {missing[0]}, which Qwen2-MoE needs")
    target.load_state_dict(tensors, strict=False)
    target.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        target.generation_config = copy.deepcopy(model.generation_config)
    return target


def qwen2_moe_config(source: Any, plan: ExportPlan) -> Any:
    """The ``Qwen2MoeConfig`` of the exported model (see the module docstring)."""
    import transformers

    heads = source.num_attention_heads
    ids = {k: getattr(source, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return transformers.Qwen2MoeConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(source, "num_key_value_heads", None) or heads,
        hidden_act=plan.hidden_act,
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps,
        rope_parameters=dict(source.rope_parameters),
        tie_word_embeddings=bool(getattr(source, "tie_word_embeddings", False)),
        attention_dropout=float(getattr(source, "attention_dropout", 0.0)),
        use_sliding_window=False,
        decoder_sparse_step=1,
        num_experts=plan.num_experts,
        num_experts_per_tok=plan.experts_per_token,
        moe_intermediate_size=plan.expert_size,
        shared_expert_intermediate_size=plan.shared_size,
        norm_topk_prob=False,
        mlp_only_layers=plan.dense_layers,
        qkv_bias=True,
        output_router_logits=False,
        **ids,
    )


def _dense_mlp(source: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A dense FFN's gate/up/down weights, copied; a non-zero bias is refused."""
    out = {}
    for part in _MLP_PARTS:
        key = f"{prefix}{part}.weight"
        if key not in source:
            raise MoefyError(f"{key} is missing: the dense FFN is not a Llama-style MLP")
        out[key] = source[key]
        bias = source.get(f"{prefix}{part}.bias")
        if bias is not None and bool(bias.ne(0).any()):
            raise MoefyError(f"{prefix}{part} has a bias: Qwen2-MoE MLPs have none")
    return out


def _moe_block(
    layer: LayerPlan, plan: ExportPlan, prefix: str, router: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The Qwen2-MoE block tensors of one moefied layer (fused expert layout, fp32)."""
    moe, ns = layer.moe, layer.moe.num_shared
    S, S_max, E_r = moe.expert_size, plan.expert_size, plan.num_experts
    w_in = moe.w_in.detach().float().cpu()  # (E, 2S, D)
    w_out = moe.w_out.detach().float().cpu()  # (E, S, D)
    gate_up = torch.zeros(E_r, 2 * S_max, moe.d_model)  # (E_r, 2 S_max, D)
    gate_up[:, :S] = w_in[ns:, :S]
    gate_up[:, S_max : S_max + S] = w_in[ns:, S:]
    down = torch.zeros(E_r, moe.d_model, S_max)  # (E_r, D, S_max)
    down[:, :, :S] = w_out[ns:].transpose(1, 2) * E_r  # undoes the ~1/E_r probabilities
    shared_gate, shared_up, shared_down = _shared_expert(moe, w_in, w_out, plan.shared_size)
    return {
        f"{prefix}gate.weight": router.float().cpu(),
        f"{prefix}experts.gate_up_proj": gate_up,
        f"{prefix}experts.down_proj": down,
        f"{prefix}shared_expert.gate_proj.weight": shared_gate,
        f"{prefix}shared_expert.up_proj.weight": shared_up,
        f"{prefix}shared_expert.down_proj.weight": shared_down,
        f"{prefix}shared_expert_gate.weight": torch.zeros(1, moe.d_model),
    }


def _shared_expert(
    moe: Any, w_in: torch.Tensor, w_out: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared experts' real neurons side by side, zero-padded to ``width`` (F_sh): gate
    (F_sh, D), up (F_sh, D), down (D, F_sh) times 2 (the zero gate's sigmoid is 0.5)."""
    ns, S, D = moe.num_shared, moe.expert_size, moe.d_model
    real = (moe.perm[:ns] >= 0).cpu().reshape(-1)  # (ns*S,)
    n = int(real.sum())
    gate, up, down = torch.zeros(width, D), torch.zeros(width, D), torch.zeros(D, width)
    gate[:n] = w_in[:ns, :S].reshape(-1, D)[real]
    up[:n] = w_in[:ns, S:].reshape(-1, D)[real]
    down[:, :n] = 2.0 * w_out[:ns].reshape(-1, D)[real].t()
    return gate, up, down


def _add_zero_biases(tensors: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> None:
    """Zero q/k/v biases where the source attention has none (Qwen2-MoE's always has them)."""
    for key, like in wanted.items():
        if key.endswith("_proj.bias") and ".self_attn." in key and key not in tensors:
            tensors[key] = torch.zeros(like.shape)
