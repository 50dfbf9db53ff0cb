"""Rotated activation sparsity (LaRoSa): threshold a linear layer's input in a rotated basis.

A linear layer reads ``y = x W^T + b``. For any orthogonal ``Q`` (``Q Q^T = 1``),
``y = (x Q) (W Q)^T + b``: the layer can read the rotated input ``z = x Q`` through the rotated
weight ``W Q`` and compute the same thing. In the basis of the principal components of the
calibration inputs (the eigenvectors of ``x^T x``), the energy of ``x`` sits in few channels, so
a magnitude threshold on ``|z|`` drops more entries for the same error than one on ``|x|``.

The rotation is computed online, once per input: the projections that read one tensor (gate
and up; q, k and v) share a :class:`SharedRotation` that rotates it on the first call and hands
the result to the others. That costs ``C * C`` multiply-adds per token, split over the group's
wrappers as their ``overhead_weights``. The rotated weight is derived data (like the kernels'
transposed weights): made from ``base_layer`` and the ``rotation`` buffer when either changes,
kept outside the state dict, so a saved model stores ``W`` and ``Q`` only; in memory it is one
more copy of each rotated projection's weight.

Shape legend:
    N: tokens (any leading dims), C: input channels of a linear layer, O: its output features
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from moefy import kernels
from moefy.cost import tensor_bytes
from moefy.errors import MoefyError
from moefy.sparsify.wrappers import ThresholdLinear

__all__ = ["RotatedLinear", "SharedRotation", "check_foldable", "principal_rotation"]


def _tensor_key(tensor: torch.Tensor) -> tuple:
    return (tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device, tuple(tensor.shape))


def check_foldable(paths_and_layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse layers whose weight a rotation cannot be folded into.

    A rotation is folded into a 2-D floating weight read as ``x W^T`` (``nn.Linear``) or
    ``x W`` (GPT-2's ``Conv1D``); a quantized layer, a fused expert bank or any other module
    computes something else from its input.

    Raises:
        MoefyError: naming the layers and why.

    Example:
        >>> check_foldable([("model.layers.0.mlp.up_proj", nn.Linear(8, 16))])
    """
    bad = []
    for path, layer in paths_and_layers:
        weight = getattr(layer, "weight", None)
        is_linear = isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D"
        if not is_linear or weight is None or weight.dim() != 2 or not weight.is_floating_point():
            bad.append(f"{path} ({type(layer).__name__})")
    if bad:
        raise MoefyError(
            f"rotate folds a rotation into the weights that read each input, and "
            f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a float nn.Linear or "
            "Conv1D: dequantize or unmoefy the model first, or use teal"
        )


def principal_rotation(moment: torch.Tensor) -> torch.Tensor:
    """The (C, C) orthogonal PCA rotation of a second-moment matrix ``x^T x``.

    Columns are the eigenvectors in order of descending eigenvalue, each signed so that its
    largest-magnitude entry is positive (the same rotation on every run and rank).

    Args:
        moment: (C, C) symmetric positive semi-definite matrix (float64 preferred).

    Returns:
        (C, C) float64 ``Q`` with ``Q^T Q = 1``.

    Example:
        >>> x = torch.randn(100, 8, dtype=torch.float64)
        >>> q = principal_rotation(x.T @ x)
        >>> torch.allclose(q.T @ q, torch.eye(8, dtype=torch.float64))
        True
    """
    _, vectors = torch.linalg.eigh(moment.double())  # ascending eigenvalues
    vectors = vectors.flip(-1)  # (C, C) descending
    peak = vectors.abs().argmax(dim=0)  # (C,)
    signs = torch.sign(vectors[peak, torch.arange(vectors.shape[1])])
    return vectors * torch.where(signs == 0, 1.0, signs)


class SharedRotation:
    """Rotates one input once for all the projections that read it.

    Members call :meth:`rotate` (or :meth:`skip` when they run dense) with the tensor they got;
    the first call of a new input object rotates it, the others of the same round reuse the
    result. The cache holds one input and its rotation until every member has read it, so at
    most one pair per group outlives a forward pass. Compiled calls rotate each time (a trace
    cannot test object identity across modules).

    Example:
        >>> shared = SharedRotation(members=2)
    """

    def __init__(self, members: int) -> None:
        self.members = members
        self._clear()

    def _clear(self) -> None:
        self._input: torch.Tensor | None = None
        self._rotated: torch.Tensor | None = None
        self._left = 0

    def _arrive(self, x: torch.Tensor) -> None:
        if self._input is not x or self._left <= 0:
            self._input, self._rotated, self._left = x, None, self.members
        self._left -= 1

    def rotate(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C): ``x @ rotation``, computed once per input object."""
        if torch.compiler.is_compiling() or self.members == 1:
            return x @ rotation.to(x.dtype)
        self._arrive(x)
        rotated = self._rotated if self._rotated is not None else x @ rotation.to(x.dtype)
        if self._left > 0:
            self._rotated = rotated
        else:
            self._clear()
        return rotated

    def skip(self, x: torch.Tensor) -> None:
        """Record that a member read ``x`` without rotating it."""
        if torch.compiler.is_compiling() or self.members == 1:
            return
        self._arrive(x)
        if self._left <= 0:
            self._clear()


class RotatedLinear(ThresholdLinear):
    """Zero entry ``z_i`` of the rotated input ``z = x Q`` when ``|z_i| <= threshold``, then read
    ``z`` through the rotated weight ``W Q``.

    With a zero threshold the layer runs ``base_layer`` itself (exactly the dense layer). Decode-
    sized batches take the same ``threshold_linear`` kernel as :class:`ThresholdLinear`, fed the
    rotated tokens and the rotated weight.

    Attributes:
        rotation: buffer (C, C), orthogonal; the identity until calibration sets it.
        shared: the :class:`SharedRotation` of the projections reading the same input.
        overhead_weights: this wrapper's share of the ``C * C`` rotation per token.

    Example:
        >>> shared = SharedRotation(members=1)
        >>> layer = RotatedLinear(nn.Linear(8, 4), layer=0, role="up_proj", shared=shared,
        ...                       overhead_weights=64)
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        layer: int,
        role: str,
        shared: SharedRotation,
        overhead_weights: int,
    ) -> None:
        super().__init__(base_layer, layer=layer, role=role)
        device = base_layer.weight.device
        eye = torch.eye(self.in_features, dtype=torch.float32, device=device)
        self.register_buffer("rotation", eye)  # (C, C)
        self.shared = shared
        self.overhead_weights = overhead_weights
        self._rotated_t: torch.Tensor | None = None  # (C, O) = (W Q)^T, derived
        self._rotated_key: tuple | None = None
        self._frozen_dense: bool | None = None  # set by freeze_for_compile

    def rotated_weight_t(self) -> torch.Tensor:
        """(C, O) contiguous ``(W Q)^T = Q^T W^T`` in the weight's dtype, remade when the weight
        or the rotation changed."""
        weight = self.base_layer.weight.detach()
        key = (_tensor_key(weight), _tensor_key(self.rotation))
        if self._rotated_t is None or self._rotated_key != key:
            weight_t = weight.t() if isinstance(self.base_layer, nn.Linear) else weight  # (C, O)
            rotated = self.rotation.float().t() @ weight_t.float()  # (C, O)
            self._rotated_t = rotated.to(weight.dtype).contiguous()
            self._rotated_key = key
        return self._rotated_t

    def observe(self, callback: Callable[[torch.Tensor], None]) -> RemovableHandle:
        def _hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            callback(x @ self.rotation.to(x.dtype))  # (..., C): the tensor thresholded

        return self.register_forward_pre_hook(_hook)

    def kept_weight_bytes(self) -> float:
        """The kept rows of the rotated weight and this wrapper's share of the rotation."""
        share = self.overhead_weights / max(self.in_features**2, 1)
        return super().kept_weight_bytes() + tensor_bytes([self.rotation]) * share

    def freeze_for_compile(self) -> None:
        """Decide now (for ``torch.compile``d calls) whether the layer runs dense and, if not,
        make the rotated weight it reads. Call again after changing weight, rotation or
        threshold; :class:`moefy.decoding.StaticDecoder` calls it."""
        self._frozen_dense = kernels.is_all_zero(self.threshold)
        self._frozen_weight_t = None if self._frozen_dense else self.rotated_weight_t()

    def _plan(self) -> tuple[bool, torch.Tensor | None]:
        """(dense, rotated weight (C, O) or None) for this call."""
        if torch.compiler.is_compiling():
            if self._frozen_dense is None:
                raise MoefyError(
                    "a rotated layer was compiled without freeze_for_compile: call "
                    "moefy.decoding.freeze_for_compile(model) before torch.compile"
                )
            return self._frozen_dense, self._frozen_weight_t
        if kernels.is_all_zero(self.threshold):
            return True, None
        return False, self.rotated_weight_t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense, weight_t = self._plan()
        if dense or weight_t is None:
            self.shared.skip(x)
            self._count(x)
            return self.base_layer(x)  # (..., O) exactly the dense layer
        rotated = self.shared.rotate(x, self.rotation)  # (..., C)
        tokens = rotated.reshape(-1, self.in_features)  # (N, C)
        if kernels.kernel_fits("threshold_linear", tokens, weight_t, extras=(self.bias,)):
            counter = self._kernel_counter(tokens)
            out = kernels.threshold_linear(tokens, weight_t, self.bias, self.threshold, counter)
            return out.reshape(*x.shape[:-1], self.out_features)
        kept = self.sparsify_input(rotated)  # (..., C)
        self._count(kept)
        return F.linear(kept, weight_t.t(), self.bias)  # (..., O)
