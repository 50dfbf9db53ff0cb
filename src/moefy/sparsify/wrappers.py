"""Sparse wrappers: modules that take the place of a linear layer or an activation and zero entries.

Each wrapper keeps the module it replaced as ``base_layer`` (so :func:`unsparsify` puts back the
very same object), holds its calibrated thresholds as buffers (saved with the model) and counts,
in non-persistent integer buffers, how many entries it zeroed on the text it ran on. The forward
pass multiplies by a mask; the numbers equal those of a kernel that skips the weight columns (or
rows) of the zeroed entries, because a zero entry contributes exactly nothing to the product.
Each wrapper reports what it spent through the cost protocol of :mod:`moefy.cost`.

Shape legend:
    N: tokens (any leading dims), I: input features of a linear layer, O: its output features,
    F: FFN width (neurons)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from moefy import kernels
from moefy.arch.spec import set_submodule
from moefy.cost import FLOPS_PER_MULTIPLY_ADD, ModuleCost, reset_counters, tensor_bytes
from moefy.device import model_device

__all__ = [
    "SPARSIFY_CONFIG_ATTR",
    "SparseModule",
    "ThresholdActivation",
    "ThresholdLinear",
    "TopKLinear",
    "counters_paused",
    "input_column_norms",
    "linear_shape",
    "reset_counters",
    "sparse_modules",
    "unsparsify",
]

SPARSIFY_CONFIG_ATTR = "moefy_sparsify_config"

# set by counters_paused: calibration's forward passes leave the wrappers' counters alone
_counters_paused = False


@contextlib.contextmanager
def counters_paused() -> Iterator[None]:
    """Skip every wrapper's zero counting inside the block (calibration passes: their counts
    would be reset anyway, and counting costs two passes over each sparsified tensor)."""
    global _counters_paused
    previous, _counters_paused = _counters_paused, True
    try:
        yield
    finally:
        _counters_paused = previous


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight (I, O))."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        return weight.shape[0], weight.shape[1]
    return weight.shape[1], weight.shape[0]  # Conv1D


def input_column_norms(module: nn.Module) -> torch.Tensor:
    """(I,) float32 L2 norm of each input column ``||W[:, i]||`` of a Linear or Conv1D layer."""
    weight = module.weight.detach().float()
    if isinstance(module, nn.Linear):
        return weight.norm(dim=0)  # weight (O, I)
    return weight.norm(dim=1)  # Conv1D weight (I, O)


class SparseModule(nn.Module):
    """Base of the wrappers: the replaced module, the counters and the accounting facts.

    Attributes:
        base_layer: the module this wrapper replaced.
        layer: index of the transformer block (FFN site) it belongs to.
        role: what it sparsifies, e.g. ``"gate_proj"``, ``"down_proj"``, ``"act_fn"``,
            ``"self_attn.q_proj"``.
        scope_weights: weight entries per token of the dense computation this wrapper accounts
            for (its own layer's, or the whole FFN's for neuron-level wrappers).
        weights_per_zero: weight entries a kernel skips for each zeroed entry.
        overhead_weights: multiply-adds per token the wrapper spends beyond its base layer's
            (an input rotation, a low-rank correction); counted in :meth:`measured_cost`, and
            added to the budget a calibration spends (0 for the plain wrappers).
    """

    overhead_weights: int = 0

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        layer: int,
        role: str,
        scope_weights: int,
        weights_per_zero: int,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer = layer
        self.role = role
        self.scope_weights = scope_weights
        self.weights_per_zero = weights_per_zero
        # Counters of the text seen since the last reset; not part of the model's state. Integers,
        # so they stay exact and model.to(dtype) leaves them alone.
        # On the layer's device, so a wrapper added to a model already on the GPU counts there.
        device = model_device(base_layer)
        for name in ("zeros_seen", "entries_seen", "tokens_seen"):
            self.register_buffer(
                name, torch.zeros((), dtype=torch.int64, device=device), persistent=False
            )

    def reset_counters(self) -> None:
        """Forget what was counted."""
        self.zeros_seen.zero_()
        self.entries_seen.zero_()
        self.tokens_seen.zero_()

    def dense_flops_per_token(self) -> int:
        """FLOPs per token of the replaced module run densely (what the counters skip from)."""
        raise NotImplementedError

    def kept_weight_bytes(self) -> float:
        """Weight bytes of ``base_layer`` one token reads (all of them unless overridden)."""
        return tensor_bytes(self.base_layer.parameters())

    def measured_cost(self) -> ModuleCost:
        """The dense FLOPs of the tokens seen less 2 per skipped weight, and the bytes read.

        Returns:
            :class:`moefy.cost.ModuleCost` (the cost protocol).
        """
        tokens = int(self.tokens_seen)
        skipped = int(self.zeros_seen) * self.weights_per_zero
        extra = self.overhead_weights * tokens
        flops = self.dense_flops_per_token() * tokens - FLOPS_PER_MULTIPLY_ADD * (skipped - extra)
        return ModuleCost(flops=float(flops), weight_bytes=self.kept_weight_bytes(), tokens=tokens)

    def _count(self, sparse: torch.Tensor) -> None:
        """Count the zero entries of the sparsified tensor (..., C): those a kernel skips."""
        if _counters_paused:
            return
        with torch.no_grad():
            self.zeros_seen += (sparse == 0).sum()
            self.entries_seen += sparse.numel()
            self.tokens_seen += sparse.numel() // max(sparse.shape[-1], 1)

    def _kernel_counter(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """For a kernel call on (N, C) ``tokens``: count its entries and tokens here and return
        the ``zeros_seen`` buffer the kernel adds its dropped inputs to (None while paused)."""
        if _counters_paused:
            return None
        self.entries_seen += tokens.numel()
        self.tokens_seen += tokens.shape[0]
        return self.zeros_seen

    def observe(self, callback: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """Call ``callback`` with the tensor this wrapper sparsifies (before sparsifying) on every
        forward pass; remove the hook with the returned handle."""
        raise NotImplementedError


class _InputSparseLinear(SparseModule):
    """A linear (or Conv1D) layer whose input entries are zeroed first; skips columns of W."""

    def __init__(self, base_layer: nn.Module, *, layer: int, role: str) -> None:
        out_features, in_features = linear_shape(base_layer)
        super().__init__(
            base_layer,
            layer=layer,
            role=role,
            scope_weights=out_features * in_features,
            weights_per_zero=out_features,
        )
        self.in_features = in_features
        self.out_features = out_features

    # Model code sometimes reads the projection's weight (dtype checks in T5, shapes): delegate.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def observe(self, callback: Callable[[torch.Tensor], None]) -> RemovableHandle:
        def _hook(_module: nn.Module, args: tuple) -> None:
            callback(args[0])  # returns None: a pre-hook's return value would replace the input

        return self.register_forward_pre_hook(_hook)

    def dense_flops_per_token(self) -> int:
        bias = self.out_features if self.bias is not None else 0
        return FLOPS_PER_MULTIPLY_ADD * self.in_features * self.out_features + bias

    def kept_weight_bytes(self) -> float:
        """The weights of the kept inputs: the layer's bytes times the measured kept share."""
        seen = int(self.entries_seen)
        kept = 1.0 - int(self.zeros_seen) / seen if seen else 1.0
        return tensor_bytes(self.base_layer.parameters()) * kept

    def sparsify_input(self, x: torch.Tensor) -> torch.Tensor:
        """(..., I) -> (..., I) with the dropped entries set to zero."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sparsify_input(x)  # (..., I)
        self._count(x)
        return self.base_layer(x)  # (..., O)


class ThresholdLinear(_InputSparseLinear):
    """Zero input entry ``x_i`` when ``|x_i| <= threshold_i``, then apply the linear layer.

    Attributes:
        threshold: buffer, () for one threshold per layer (TEAL) or (I,) for one per input
            channel (WINA). Zero keeps the layer dense.

    Example:
        >>> layer = ThresholdLinear(nn.Linear(8, 4), layer=0, role="up_proj")
        >>> layer.threshold.fill_(0.5)
    """

    def __init__(
        self, base_layer: nn.Module, *, layer: int, role: str, per_channel: bool = False
    ) -> None:
        super().__init__(base_layer, layer=layer, role=role)
        shape = (self.in_features,) if per_channel else ()
        self.register_buffer(
            "threshold", torch.zeros(shape, dtype=torch.float32, device=model_device(base_layer))
        )
        # (I, O) weight for compiled steps, set by freeze_for_compile; None: the masked path
        self._frozen_weight_t: torch.Tensor | None = None

    def sparsify_input(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and kernels.is_all_zero(self.threshold):
            return x  # a zero threshold drops only the entries that are zero already
        return x.masked_fill(x.abs() <= self.threshold, 0.0)

    def freeze_for_compile(self) -> None:
        """Decide the kernel's weight layout now, for ``torch.compile``d calls.

        Eager calls find the transposed weight and the all-zero test in caches keyed by data
        pointers, which a trace cannot evaluate; a compiled call uses what this stored instead
        (the kernel when the threshold is not zero everywhere). Call it again after changing the
        weight or zeroing the threshold; :class:`moefy.decoding.StaticDecoder` calls it.
        """
        dense = kernels.is_all_zero(self.threshold)
        self._frozen_weight_t = None if dense else kernels.transposed_weight(self.base_layer)

    def _apply(self, fn, recurse: bool = True):
        # .to() / .half() / .cuda() replace the weight; a frozen layout must follow it
        result = super()._apply(fn, recurse)
        if self._frozen_weight_t is not None:
            self.freeze_for_compile()
        return result

    def _kernel_weight(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The (I, O) weight the kernel reads if this call of (N, I) tokens takes it, else None."""
        if torch.compiler.is_compiling():
            weight_t = self._frozen_weight_t
            if weight_t is None:
                return None
            fits = kernels.kernel_fits("threshold_linear", tokens, weight_t)
            return weight_t if fits is not None else None
        weight = self.base_layer.weight  # (O, I): the kernel reads a contiguous (I, O) copy
        fits = kernels.kernel_fits("threshold_linear", tokens, weight, contiguous=False)
        if fits is None or kernels.is_all_zero(self.threshold):  # zero thresholds: dense is exact
            return None
        return kernels.transposed_weight(self.base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, self.in_features)  # (N, I)
        weight_t = self._kernel_weight(tokens)  # (I, O) or None
        if weight_t is None:
            return super().forward(x)  # the masked path (the reference)
        # Decode-sized batch: a kernel (C++ on the CPU, Triton on CUDA) that skips the weight
        # rows of dropped inputs and counts them into zeros_seen itself.
        out = kernels.threshold_linear(
            tokens, weight_t, self.bias, self.threshold, self._kernel_counter(tokens)
        )
        return out.reshape(*x.shape[:-1], self.out_features)  # (..., O)


class TopKLinear(_InputSparseLinear):
    """Keep the ``k`` largest-magnitude input entries of every token, zero the rest.

    Example:
        >>> TopKLinear(nn.Linear(64, 8), layer=0, role="down_proj", k=16)
    """

    def __init__(self, base_layer: nn.Module, *, layer: int, role: str, k: int) -> None:
        super().__init__(base_layer, layer=layer, role=role)
        self.k = k

    def sparsify_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.k >= x.shape[-1]:
            return x
        top = x.abs().topk(self.k, dim=-1).indices  # (..., k)
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, top, True)
        return x.masked_fill(~keep, 0.0)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class ThresholdActivation(SparseModule):
    """Zero neuron ``i`` of an activation's output ``a`` when ``|a_i| <= threshold_i``.

    Wraps the activation applied to the gate of a gated FFN: a zeroed neuron skips its row of the
    up projection and its column of the down projection (the gate projection runs in full).

    Attributes:
        threshold: buffer, () for one threshold per layer (CATS) or (F,) for one per neuron (CHESS).

    Example:
        >>> ThresholdActivation(nn.SiLU(), layer=0, role="act_fn", d_model=576, d_ff=1536)
    """

    # The activation and the gating product act(g) * u of the gated FFN it sits in.
    FLOPS_PER_NEURON = 2

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        layer: int,
        role: str,
        d_model: int,
        d_ff: int,
        per_channel: bool = False,
    ) -> None:
        super().__init__(
            base_layer,
            layer=layer,
            role=role,
            scope_weights=3 * d_model * d_ff,  # gate, up and down of the FFN
            weights_per_zero=2 * d_model,  # one up row, one down column
        )
        self.d_ff = d_ff
        shape = (d_ff,) if per_channel else ()
        self.register_buffer(
            "threshold", torch.zeros(shape, dtype=torch.float32, device=model_device(base_layer))
        )

    def observe(self, callback: Callable[[torch.Tensor], None]) -> RemovableHandle:
        def _hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            callback(out)  # returns None: a hook's return value would replace the output

        return self.base_layer.register_forward_hook(_hook)

    def dense_flops_per_token(self) -> int:
        return self.FLOPS_PER_NEURON * self.d_ff

    def forward(self, gate: torch.Tensor) -> torch.Tensor:
        activation = self.base_layer(gate)  # (..., F)
        activation = activation.masked_fill(activation.abs() <= self.threshold, 0.0)
        self._count(activation)
        return activation


def sparse_modules(model: nn.Module) -> Iterator[tuple[str, SparseModule]]:
    """(dotted path, wrapper) of every sparse wrapper in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, SparseModule):
            yield name, module


def unsparsify(model: nn.Module) -> nn.Module:
    """Put back the dense modules that :func:`moefy.sparsify.sparsify_` replaced, in place.

    The original module objects return, so the model computes exactly what it did before.

    Args:
        model: a model changed by ``sparsify_`` or loaded by ``load_sparse``.

    Returns:
        The same model object, dense.

    Example:
        >>> sparsify_(model, TopKConfig(sparsity=0.5))
        >>> unsparsify(model)
    """
    for name, wrapper in list(sparse_modules(model)):
        set_submodule(model, name, wrapper.base_layer)
    if hasattr(model, SPARSIFY_CONFIG_ATTR):
        delattr(model, SPARSIFY_CONFIG_ATTR)
    return model
