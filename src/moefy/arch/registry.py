"""The architecture table: one :class:`FFNSpec` per ``config.model_type``.

Adding an architecture is one entry here, or a call to :func:`register_architecture` from user
code. Everything else (profiler, MoEfication, thresholds, attention sparsity, layer dropping)
reads the model through :func:`find_ffns` and the spec's paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from moefy.arch.spec import FFNSite, FFNSpec, ProjectionPaths, get_submodule, set_submodule
from moefy.errors import MoefyError

SpecOrFactory = FFNSpec | Callable[[object], FFNSpec]

_LLAMA_LIKE = FFNSpec(
    stacks=(("model.layers", "mlp"),),
    up="up_proj",
    gate="gate_proj",
    down="down_proj",
    act="act_fn",
    attention="self_attn",
    attention_projections=tuple(f"self_attn.{p}_proj" for p in "qkvo"),
)
_T5_SELF = tuple(f"layer.0.SelfAttention.{p}" for p in "qkvo")
_T5_CROSS = tuple(f"layer.1.EncDecAttention.{p}" for p in "qkvo")


def _t5_projections(block: nn.Module) -> tuple[str, ...]:
    """T5's decoder blocks (three sublayers) add cross-attention to self-attention."""
    is_decoder = bool(getattr(block, "is_decoder", False)) or len(getattr(block, "layer", ())) == 3
    return _T5_SELF + _T5_CROSS if is_decoder else _T5_SELF


def _t5_spec(config: object) -> FFNSpec:
    gated = bool(getattr(config, "is_gated_act", False))
    stacks = (
        ("encoder.block", "layer.1.DenseReluDense"),
        ("decoder.block", "layer.2.DenseReluDense"),
    )
    if getattr(config, "is_encoder_decoder", True) is False:  # T5EncoderModel
        stacks = stacks[:1]
    if gated:
        return FFNSpec(
            stacks=stacks,
            up="wi_1",
            gate="wi_0",
            down="wo",
            act="act",
            attention_projections=_t5_projections,
        )
    return FFNSpec(
        stacks=stacks, up="wi", down="wo", act="act", attention_projections=_t5_projections
    )


ARCHITECTURES: dict[str, SpecOrFactory] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": dataclasses.replace(_LLAMA_LIKE, attention_out="post_attention_layernorm"),
    "phi3": FFNSpec(
        stacks=(("model.layers", "mlp"),),
        up="gate_up_proj",
        down="down_proj",
        act="activation_fn",
        fused_gate_up=True,
        attention="self_attn",
        attention_projections=("self_attn.qkv_proj", "self_attn.o_proj"),
    ),
    "gpt2": FFNSpec(
        stacks=(("transformer.h", "mlp"),),
        up="c_fc",
        down="c_proj",
        act="act",
        conv1d=True,
        attention="attn",
        attention_projections=("attn.c_attn", "attn.c_proj"),
    ),
    "gpt_neox": FFNSpec(
        stacks=(("gpt_neox.layers", "mlp"),),
        up="dense_h_to_4h",
        down="dense_4h_to_h",
        act="act",
        attention="attention",
        attention_projections=("attention.query_key_value", "attention.dense"),
    ),
    "opt": FFNSpec(
        stacks=(("model.decoder.layers", ""),),
        up="fc1",
        down="fc2",
        act="activation_fn",
        inline=True,
        attention="self_attn",
        attention_projections=(
            *(f"self_attn.{p}_proj" for p in "qkv"),
            "self_attn.out_proj",
        ),
    ),
    "bert": FFNSpec(
        stacks=(("encoder.layer", ""),),
        up="intermediate.dense",
        down="output.dense",
        act="intermediate.intermediate_act_fn",
        inline=True,
        attention_projections=(
            *(f"attention.self.{p}" for p in ("query", "key", "value")),
            "attention.output.dense",
        ),
    ),
    "t5": _t5_spec,
}

# Modules that stand in for a dropped layer (``moefy.layers``) carry this attribute set to True.
DROPPED_MARK = "moefy_dropped"

# Task heads wrap the base model under one of these attribute names (BertForMaskedLM.bert, ...).
_BASE_PREFIXES = ("", "bert.", "transformer.", "model.", "roberta.")


def model_type_of(model: nn.Module) -> str:
    """The registry key of ``model``: ``config.model_type``, else the class name."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type or type(model).__name__


def register_architecture(model_type: str, spec: SpecOrFactory, *, overwrite: bool = False) -> None:
    """Teach moefy where the FFNs of an architecture are.

    Args:
        model_type: ``config.model_type`` of the HF model, or the class name of a plain
            ``nn.Module`` that has no config.
        spec: an :class:`FFNSpec`, or a function ``config -> FFNSpec`` when the layout depends on
            the config.
        overwrite: replace an existing entry.

    Example:
        >>> register_architecture("mymodel", FFNSpec(stacks=(("layers", "ffn"),),
        ...                       up="w1", gate="w3", down="w2", act="act"))
    """
    if model_type in ARCHITECTURES and not overwrite:
        raise MoefyError(f"architecture {model_type!r} is registered already; pass overwrite=True")
    ARCHITECTURES[model_type] = spec


def get_spec(model: nn.Module) -> FFNSpec:
    """The :class:`FFNSpec` for ``model``; a clear error if its architecture is unknown."""
    model_type = model_type_of(model)
    entry = ARCHITECTURES.get(model_type)
    if entry is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise MoefyError(
            f"unsupported architecture {model_type!r} (supported: {known}); register it with "
            f"moefy.register_architecture({model_type!r}, moefy.FFNSpec(stacks=..., up=..., "
            "down=..., act=..., gate=...)), see README 'Other architectures'"
        )
    return entry if isinstance(entry, FFNSpec) else entry(getattr(model, "config", None))


def attention_projection_paths(model: nn.Module, block: nn.Module) -> tuple[str, ...]:
    """The attention projection paths (relative to ``block``) of ``model``'s architecture.

    Args:
        model: a model of a registered architecture.
        block: one of its transformer blocks (``FFNSite.block``).

    Returns:
        Dotted paths inside ``block``, q, k, v then o (a fused projection is one path).

    Raises:
        MoefyError: the architecture is unknown, or its spec lists no attention projections.

    Example:
        >>> attention_projection_paths(llama, find_ffns(llama)[0].block)
        ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj')
    """
    paths = get_spec(model).attention_projections
    if paths is None:
        model_type = model_type_of(model)
        raise MoefyError(
            f"no attention projections known for {model_type!r}: give its FFNSpec "
            f"attention_projections=('attn.q', ...) (moefy.register_architecture({model_type!r}, "
            "spec, overwrite=True)) or sparsify the FFN only (attention=False)"
        )
    return paths if isinstance(paths, tuple) else tuple(paths(block))


def register_attention_projections(
    model_type: str, paths: ProjectionPaths, *, overwrite: bool = False
) -> None:
    """Set the ``attention_projections`` of a registered architecture's spec.

    Args:
        model_type: a key of :data:`ARCHITECTURES`.
        paths: dotted paths inside one block, or a function ``block -> paths``.
        overwrite: replace projections the spec already lists.

    Raises:
        MoefyError: the architecture is not registered, or lists projections already.

    Example:
        >>> register_attention_projections("mymodel", ("attn.wq", "attn.wk", "attn.wv", "attn.wo"))
    """
    entry = ARCHITECTURES.get(model_type)
    if entry is None:
        raise MoefyError(
            f"architecture {model_type!r} is not registered: register it first with "
            f"moefy.register_architecture({model_type!r}, moefy.FFNSpec(..., "
            "attention_projections=...))"
        )
    if isinstance(entry, FFNSpec):
        if entry.attention_projections is not None and not overwrite:
            raise MoefyError(
                f"attention projections of {model_type!r} are registered already; "
                "pass overwrite=True"
            )
        ARCHITECTURES[model_type] = dataclasses.replace(entry, attention_projections=paths)
        return

    def with_projections(config: object, factory: Callable[[object], FFNSpec] = entry) -> FFNSpec:
        return dataclasses.replace(factory(config), attention_projections=paths)

    if not overwrite:  # a factory's projections are only known per config: refuse to guess
        raise MoefyError(
            f"{model_type!r} builds its spec from the config and may list attention "
            "projections already; pass overwrite=True"
        )
    ARCHITECTURES[model_type] = with_projections


def _resolve_stack(model: nn.Module, path: str) -> tuple[str, nn.Module] | None:
    for prefix in _BASE_PREFIXES:
        full = prefix + path
        try:
            return full, model.get_submodule(full)
        except AttributeError:
            continue
    return None


def find_ffns(model: nn.Module, spec: FFNSpec | None = None) -> list[FFNSite]:
    """All FFN sites of ``model`` in layer order.

    Args:
        model: a supported HF model (any head) or a registered custom module.
        spec: use this spec instead of the registry's.

    Returns:
        One :class:`FFNSite` per FFN, numbered over all stacks.
    """
    spec = spec or get_spec(model)
    sites: list[FFNSite] = []
    for blocks_path, ffn_path in spec.stacks:
        resolved = _resolve_stack(model, blocks_path)
        if resolved is None:
            raise MoefyError(
                f"{model_type_of(model)}: no module at {blocks_path!r}; the registered FFNSpec "
                "does not match this model, fix its stacks= paths"
            )
        full_blocks, blocks = resolved
        for i, block in enumerate(blocks):
            name = ".".join(p for p in (full_blocks, str(i), ffn_path) if p)
            if _is_dropped(block, ffn_path, spec):
                raise MoefyError(
                    f"{name}: this MLP or its block was dropped by drop_layers_ (moefy drop): "
                    "profile, moefy or sparsify the model it was dropped from (or restore the "
                    "layers with restore_layers)"
                )
            try:
                module = get_submodule(block, ffn_path)
                site = FFNSite(index=len(sites), name=name, block=block, module=module, spec=spec)
                site.part("up"), site.part("down"), site.part("act")
            except AttributeError as err:
                if _is_moefied(block):
                    raise MoefyError(
                        f"{name} is a mixture-of-experts FFN (a moefied model, moefy convert): "
                        "give the dense model it was converted from (or restore its dense FFNs "
                        "with moefy.unmoefy(model))"
                    ) from None
                raise MoefyError(
                    f"{name}: {err}; the registered FFNSpec does not match this model"
                ) from None
            sites.append(site)
    if not sites:
        raise MoefyError(f"{model_type_of(model)}: the model has no FFN layers")
    return sites


def _is_moefied(block: nn.Module) -> bool:
    """Whether ``block`` holds a MoE FFN (``moefy.moe``) where the spec expects a dense one."""
    from moefy.moe.module import MoEFFN  # imported here: moefy.moe imports this module

    return any(isinstance(module, MoEFFN) for module in block.modules())


def _is_dropped(block: nn.Module, ffn_path: str, spec: FFNSpec) -> bool:
    """Whether ``block``, or the FFN slot inside it, stands in for a dropped layer."""
    if getattr(block, DROPPED_MARK, False):
        return True
    slot = ".".join(p for p in (ffn_path, spec.up if spec.inline else "") if p)
    try:
        return bool(getattr(get_submodule(block, slot), DROPPED_MARK, False))
    except AttributeError:
        return False


def replace_ffn(model: nn.Module, site: FFNSite, ffn: nn.Module) -> dict[str, nn.Module]:
    """Put ``ffn`` (a module computing x -> FFN(x)) in the place of ``site``'s FFN.

    For an inline FFN the ``up`` slot takes ``ffn`` and the ``act`` and ``down`` slots take
    ``nn.Identity`` (and ``gate``, if any). Returns the replaced modules by slot name
    (``{"ffn": module}`` for an FFN module) so the caller can put them back with
    :func:`restore_ffn`.
    """
    spec = site.spec
    if not spec.inline:
        set_submodule(model, site.name, ffn)
        return {"ffn": site.module}
    replaced: dict[str, nn.Module] = {}
    for part in ("up", "gate", "act", "down"):
        path = getattr(spec, part)
        if path is None:
            continue
        replaced[part] = get_submodule(site.block, path)
        set_submodule(site.block, path, ffn if part == "up" else nn.Identity())
    return replaced


def restore_ffn(model: nn.Module, site: FFNSite, replaced: dict[str, nn.Module]) -> None:
    """Undo :func:`replace_ffn` with the modules it returned (or rebuilt equivalents)."""
    if "ffn" in replaced:
        set_submodule(model, site.name, replaced["ffn"])
        return
    for part, module in replaced.items():
        set_submodule(site.block, getattr(site.spec, part), module)
