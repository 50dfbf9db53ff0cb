"""How to find and read a model's feed-forward layers: the spec, the site, the canonical weights.

Shape legend:
    N: tokens, D: model width (d_model), F: FFN width (d_ff)

Every capability in moefy works on the canonical view :class:`FFNWeights`:

    gated:      y = W_down (act(W_gate x + b_gate) * (W_up x + b_up)) + b_down
    not gated:  y = W_down  act(W_up x + b_up) + b_down

with ``W_up``/``W_gate`` of shape (F, D) and ``W_down`` of shape (D, F), whatever the layout the
architecture stores (fused gate/up rows, GPT-2's transposed Conv1D, FFNs spread over a block).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moefy.errors import MoefyError

# attention projection paths inside a block, or a function of the block that gives them
ProjectionPaths = tuple[str, ...] | Callable[[nn.Module], tuple[str, ...]]


@dataclass(frozen=True)
class FFNSpec:
    """Where an architecture keeps its FFNs and how they compute.

    Attributes:
        stacks: pairs ``(blocks, ffn)``: the dotted path from the model root to a ``ModuleList``
            of blocks, and the dotted path of the FFN inside one block (``""`` for the block
            itself). Encoder-decoder models have two stacks; their layers are numbered
            encoder first.
        up: path (inside the FFN) of the input projection. With ``fused_gate_up`` it holds the
            gate rows first, then the up rows.
        down: path of the output projection.
        act: path of the activation module.
        gate: path of the gate projection of a gated FFN, ``None`` if not gated.
        fused_gate_up: ``up`` is one linear layer with rows ``[gate; up]`` (Phi-3).
        conv1d: projections are GPT-2 ``Conv1D`` layers whose weight is stored (in, out).
        inline: the FFN is not a module of its own; the block calls ``up``, ``act`` and ``down``
            in its forward (OPT, BERT). Swapping then replaces ``up`` with the whole FFN and
            ``act`` and ``down`` with ``nn.Identity``.
        attention: path (inside one block) of the self-attention sublayer, ``None`` when not
            registered; needed to measure and drop attention layers (:mod:`moefy.layers`).
        attention_out: path (inside one block) of the module whose output is what attention adds
            to the residual stream, when that is not the attention itself (Gemma 2's
            post-attention norm); ``None`` means ``attention``.
        attention_projections: paths (inside one block) of the attention's linear projections
            (q, k, v, o; a fused ``qkv`` is one path), or a function ``block -> paths`` when the
            blocks of one model differ (T5's decoder blocks add cross-attention); ``None`` when
            not registered. Sparsifying attention (``attention=True``) reads it.

    Example:
        >>> FFNSpec(stacks=(("model.layers", "mlp"),), up="up_proj", gate="gate_proj",
        ...         down="down_proj", act="act_fn")
    """

    stacks: tuple[tuple[str, str], ...]
    up: str
    down: str
    act: str
    gate: str | None = None
    fused_gate_up: bool = False
    conv1d: bool = False
    inline: bool = False
    attention: str | None = None
    attention_out: str | None = None
    attention_projections: ProjectionPaths | None = None

    def __post_init__(self) -> None:
        if not self.stacks:
            raise MoefyError("FFNSpec.stacks is empty: give at least one (blocks, ffn) path pair")
        if self.fused_gate_up and self.gate is not None:
            raise MoefyError("FFNSpec: give either gate= or fused_gate_up=True, not both")

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` with ``""`` meaning ``root``."""
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (non-empty) with ``module``."""
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(root, parent_path)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _linear_weight(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """The (out, in) weight of a linear or Conv1D layer, as a view (no copy)."""
    weight = module.weight
    return weight.t() if conv1d else weight


def _linear_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


@dataclass
class FFNWeights:
    """The canonical weights of one FFN; tensors are views of the model's parameters.

    Attributes:
        w_up: (F, D) input projection.
        w_down: (D, F) output projection; column i is neuron i's output direction.
        act: the activation (an ``nn.Module`` or callable on tensors).
        w_gate: (F, D) gate projection of a gated FFN, else ``None``.
        b_up, b_gate: (F,) biases or ``None``; b_down: (D,) or ``None``.
    """

    w_up: torch.Tensor
    w_down: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]
    w_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    b_down: torch.Tensor | None = None

    @property
    def d_model(self) -> int:
        return self.w_up.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w_up.shape[0]

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Neuron activations h, the input of the down projection: (..., D) -> (..., F)."""
        up = nn.functional.linear(x, self.w_up, self.b_up)
        if self.w_gate is None:
            return self.act(up)
        return self.act(nn.functional.linear(x, self.w_gate, self.b_gate)) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference dense FFN: (..., D) -> (..., D)."""
        return nn.functional.linear(self.hidden(x), self.w_down, self.b_down)

    __call__ = forward

    def neuron_norms(self) -> torch.Tensor:
        """(F,) L2 norm of each neuron's output direction, ``||W_down[:, i]||``."""
        return self.w_down.detach().float().norm(dim=0)


@dataclass
class FFNSite:
    """One FFN found in a model.

    Attributes:
        index: layer number, counted over all stacks (encoder first).
        name: dotted path of the FFN module (or of the block, for inline FFNs).
        block: the block that holds it.
        module: the FFN module (the block itself when ``spec.inline``).
        spec: the architecture's spec.
    """

    index: int
    name: str
    block: nn.Module
    module: nn.Module
    spec: FFNSpec

    def part(self, which: str) -> nn.Module:
        """The submodule ``up``, ``gate``, ``down`` or ``act`` of this FFN."""
        path = getattr(self.spec, which)
        if path is None:
            raise MoefyError(f"{self.name}: this FFN has no {which!r} projection")
        return get_submodule(self.module, path)

    @property
    def input_module(self) -> nn.Module:
        """The module whose input is the FFN input x (forward pre-hook here to read x)."""
        return self.part("up")

    @property
    def output_module(self) -> nn.Module:
        """The module whose input is h and whose output is the FFN output (minus nothing)."""
        return self.part("down")

    def weights(self) -> FFNWeights:
        """The canonical weights of this FFN (views of the parameters)."""
        spec = self.spec
        up_mod, down_mod = self.part("up"), self.part("down")
        w_up = _linear_weight(up_mod, spec.conv1d)
        b_up = _linear_bias(up_mod)
        w_gate = b_gate = None
        if spec.fused_gate_up:
            half = w_up.shape[0] // 2
            w_gate, w_up = w_up[:half], w_up[half:]
            if b_up is not None:
                b_gate, b_up = b_up[:half], b_up[half:]
        elif spec.gate is not None:
            gate_mod = self.part("gate")
            w_gate = _linear_weight(gate_mod, spec.conv1d)
            b_gate = _linear_bias(gate_mod)
        return FFNWeights(
            w_up=w_up,
            w_down=_linear_weight(down_mod, spec.conv1d),
            act=self.part("act"),
            w_gate=w_gate,
            b_up=b_up,
            b_gate=b_gate,
            b_down=_linear_bias(down_mod),
        )

    def module_path(self, part: str) -> str:
        """Dotted path from the model root of the part ``up``/``gate``/``down``/``act``."""
        return _join(self.name, getattr(self.spec, part))
