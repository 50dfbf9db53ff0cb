"""Routers fitted in closed form from calibration tokens: no gradient steps, no learning rate.

Shape legend:
    N: tokens, D: model width, E: experts, E_r: routed (scored) experts, S: expert size,
    R: representative neurons per expert, R_in: their input rows (2R gated: gate then up; R)

Two routers, both predicting each expert's output norm ``||W_out_e h_e||`` (non-negative, so the
dynamic rules can treat scores as masses):

- ``analytic`` (CMoE's analytic router): each expert is scored by R of its own neurons,
  ``score_e(x) = sum_r |act(g_r . x + b) * (u_r . x + b)| * ||W_down[:, r]||`` (non-gated FFN:
  ``|act(u_r . x + b)| * ||W_down[:, r]||``), computed with the MoE layer's own activation. The
  representatives are the R neurons whose contribution ``|h_j| * ||W_down[:, j]||`` correlates
  best (Pearson, over calibration tokens) with their expert's true output norm.
- ``lstsq``: one linear map D -> E plus bias fitted by ridge regression to the true norms,
  clamped at 0.

:func:`moefy.routing.train_routers` collects (inputs, true norms) once and calls
:meth:`ClosedFormRouter.fit` per layer. Shared experts (the first ``num_shared`` of a layer,
which always run) are neither fitted nor scored: their score is 0 and their FLOPs are not
counted; the selector forces them in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as Fn

from moefy.errors import MoefyError
from moefy.moe.selectors import TOPK
from moefy.routing.config import DEFAULT_REPRESENTATIVES, DEFAULT_RIDGE
from moefy.routing.routers import Router, register_router
from moefy.validate import check_int, check_number

if TYPE_CHECKING:
    from moefy.moe.module import MoEFFN

# Tokens per chunk when streaming calibration statistics (bounds the (n, E_r, S) activations).
FIT_CHUNK = 1024
# Correlation given to neurons that cannot represent their expert: constant contribution (no
# variance) ranks below any real correlation, padding slots below those.
_NO_VARIANCE, _PADDING = -2.0, -3.0


class ClosedFormRouter(Router):
    """Base of the routers fitted in one closed-form step (see :meth:`fit`).

    Args:
        num_experts, d_model: E, D.
        unscored: leading experts that are not scored (the layer's shared experts): score 0,
            no cost.
        **settings: selection settings of :class:`~moefy.routing.Router`.
    """

    trainable = False
    closed_form: ClassVar[bool] = True

    def __init__(self, num_experts: int, d_model: int, *, unscored: int = 0, **settings: Any):
        super().__init__(num_experts, d_model, **settings)
        check_int("unscored experts", unscored, minimum=0)
        if unscored >= num_experts:
            raise MoefyError(
                f"a router needs at least one routed expert: {unscored} of {num_experts} are shared"
            )
        self.unscored = unscored

    @property
    def routed(self) -> int:
        """E_r, the experts this router scores."""
        return self.num_experts - self.unscored

    def fit(self, x: torch.Tensor, norms: torch.Tensor, moe: MoEFFN) -> None:
        """Fit to calibration tokens in closed form (each subclass says how).

        Args:
            x: (N, D) layer inputs.
            norms: (N, E) true expert output norms ``||W_out_e h_e||`` (float32).
            moe: the MoE layer this router serves.
        """
        raise NotImplementedError

    def _pad_unscored(self, routed_scores: torch.Tensor) -> torch.Tensor:
        """(N, E_r) -> (N, E): zeros in front for the unscored (shared) experts."""
        return Fn.pad(routed_scores, (self.unscored, 0))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "unscored": self.unscored}

    @classmethod
    def _shape_settings(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {"unscored": data.get("unscored", 0)}

    @classmethod
    def for_layer(cls, moe: MoEFFN, **settings: Any) -> Router:
        """An unfitted router for ``moe`` (its shared experts unscored); :meth:`fit` fits it."""
        settings.setdefault("unscored", int(getattr(moe, "num_shared", 0)))
        return super().for_layer(moe, **settings)


@register_router
class AnalyticRouter(ClosedFormRouter):
    """CMoE's analytic router: each expert scored by its R most representative neurons.

    Holds copies of the representatives' input rows, input biases (zeros where the FFN has
    none) and down-projection norms as buffers, so it is saved and loaded with the model;
    ``neurons`` records which dense neurons the fit chose (not saved).

    Args:
        num_experts, d_model: E, D.
        representatives: R >= 1 (at most the expert size, checked by :meth:`for_layer`).
        gated: the FFN is gated (two input rows per neuron).
        **settings: ``unscored`` and the selection settings of :class:`Router`.

    Example:
        >>> report = train_routers(model, blocks, RouterConfig(router="analytic"))
        >>> moe.selector.neurons  # (E, R) dense index of each representative, -1 for none
    """

    selector_type = "analytic"

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        *,
        representatives: int = DEFAULT_REPRESENTATIVES,
        gated: bool = True,
        **settings: Any,
    ) -> None:
        super().__init__(num_experts, d_model, **settings)
        check_int("RouterConfig.representatives", representatives, minimum=1)
        self.representatives, self.gated = representatives, bool(gated)
        E, R = num_experts, representatives
        rows_in = 2 * R if self.gated else R
        self.register_buffer("rows", torch.zeros(E, rows_in, d_model))  # (E, R_in, D)
        self.register_buffer("biases", torch.zeros(E, rows_in))  # (E, R_in)
        self.register_buffer("down_norms", torch.zeros(E, R))  # (E, R)
        # Which dense neurons were chosen: a record of the fit, not needed to score, and not
        # saved (saved selector state is floating point), so a loaded router holds -1.
        self.register_buffer(
            "neurons", torch.full((E, R), -1, dtype=torch.long), persistent=False
        )  # (E, R)

    @classmethod
    def for_layer(cls, moe: MoEFFN, **settings: Any) -> Router:
        R = settings.get("representatives", DEFAULT_REPRESENTATIVES)
        check_int("RouterConfig.representatives", R, minimum=1)
        if moe.expert_size < R:
            raise MoefyError(
                f"RouterConfig.representatives={R} is more than the expert size "
                f"{moe.expert_size} of layer {moe.layer_index}: choose 1..{moe.expert_size}"
            )
        return super().for_layer(moe, gated=moe.gated, **settings)

    def scores(self, x: torch.Tensor, moe: MoEFFN | None = None) -> torch.Tensor:
        """(N, D) -> (N, E) the representatives' summed contributions (0 for shared experts).

        Raises:
            MoefyError: no ``moe`` (its activation is needed).
        """
        if moe is None:
            raise MoefyError("the analytic router scores with its MoE layer's activation: pass moe")
        first, R = self.unscored, self.representatives
        rows = self.rows[first:]  # (E_r, R_in, D)
        pre = Fn.linear(self._cast(x), rows.flatten(0, 1), self.biases[first:].flatten())
        pre = pre.unflatten(-1, rows.shape[:2])  # (N, E_r, R_in)
        if self.gated:
            gate, up = pre.split(R, dim=-1)
            hidden = moe.act(gate) * up  # (N, E_r, R)
        else:
            hidden = moe.act(pre)
        contributions = hidden.abs() * self.down_norms[first:]  # (N, E_r, R)
        return self._pad_unscored(contributions.sum(dim=-1))

    def fit(self, x: torch.Tensor, norms: torch.Tensor, moe: MoEFFN) -> None:
        """Choose each routed expert's representatives and copy their rows.

        Args:
            x: (N, D) layer inputs.
            norms: (N, E) true expert output norms.
            moe: the layer (its ``w_in``, ``b_in``, ``w_out``, ``perm`` and ``act``).
        """
        first, S = self.unscored, moe.expert_size
        correlation = neuron_norm_correlation(moe, x, norms, first=first)  # (E_r, S)
        slots = correlation.topk(self.representatives, dim=-1).indices  # (E_r, R)
        neurons = moe.perm[first:].gather(1, slots)  # (E_r, R), -1: padding
        real = (neurons >= 0).to(self.rows.dtype)  # (E_r, R)
        in_slots = torch.cat([slots, slots + S], dim=1) if self.gated else slots  # (E_r, R_in)
        real_in = torch.cat([real, real], dim=1) if self.gated else real
        index = in_slots.unsqueeze(-1).expand(-1, -1, moe.d_model)
        with torch.no_grad():
            self.rows.zero_()
            self.biases.zero_()
            self.down_norms.zero_()
            self.neurons.fill_(-1)
            self.rows[first:] = moe.w_in[first:].gather(1, index).float() * real_in.unsqueeze(-1)
            if moe.b_in is not None:
                self.biases[first:] = moe.b_in[first:].gather(1, in_slots).float() * real_in
            down = moe.w_out[first:].float().norm(dim=-1)  # (E_r, S)
            self.down_norms[first:] = down.gather(1, slots) * real
            self.neurons[first:] = neurons

    def flops_per_token(self, d_model: int) -> float:
        # per representative: its input rows (a dot product and a bias add each), then the
        # activation, the gate product (gated), the absolute value, the norm scale and the sum
        rows = 2 if self.gated else 1
        per_neuron = rows * (2.0 * d_model + 1) + 4 + (1 if self.gated else 0)
        return self.routed * self.representatives * per_neuron

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "representatives": self.representatives, "gated": self.gated}

    @classmethod
    def _shape_settings(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {
            **super()._shape_settings(data),
            "representatives": data.get("representatives", DEFAULT_REPRESENTATIVES),
            "gated": data.get("gated", True),
        }

    @classmethod
    def config_settings(cls, config: Any) -> dict[str, Any]:
        return {"representatives": config.representatives}


@register_router
class LstsqRouter(ClosedFormRouter):
    """A linear map D -> E plus bias fitted by ridge regression to the experts' output norms.

    Scores are the predictions clamped at 0; top-k orders experts by the unclamped predictions,
    as the fused routed kernel does (one linear layer), so both paths pick the same experts.

    Args:
        num_experts, d_model: E, D.
        ridge: ridge strength relative to the mean diagonal of the centred X^T X (>= 0).
        **settings: ``unscored`` and the selection settings of :class:`Router`.

    Example:
        >>> report = train_routers(model, blocks, RouterConfig(router="lstsq"))
    """

    selector_type = "lstsq"

    def __init__(
        self, num_experts: int, d_model: int, *, ridge: float = DEFAULT_RIDGE, **settings: Any
    ) -> None:
        super().__init__(num_experts, d_model, **settings)
        check_number("RouterConfig.ridge", ridge, minimum=0.0)
        self.ridge = float(ridge)
        self.register_buffer("weight", torch.zeros(num_experts, d_model))  # (E, D)
        self.register_buffer("bias", torch.zeros(num_experts))  # (E,)

    def predictions(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, E) predicted norms, unclamped (0 for shared experts)."""
        first = self.unscored
        return self._pad_unscored(Fn.linear(self._cast(x), self.weight[first:], self.bias[first:]))

    def scores(self, x: torch.Tensor, moe: MoEFFN | None = None) -> torch.Tensor:
        """(N, D) -> (N, E) predicted norms clamped at 0."""
        return self.predictions(x).clamp_min(0.0)

    def forward(self, x: torch.Tensor, moe: Any) -> torch.Tensor:
        """(N, D) tokens -> (N, E) mask; top-k on the unclamped predictions (see class doc)."""
        if self.rule != TOPK or self.selects_all():
            return super().forward(x, moe)
        with torch.no_grad():
            return self.topk_mask(self.predictions(x))

    def fit(self, x: torch.Tensor, norms: torch.Tensor, moe: MoEFFN) -> None:
        """Ridge regression of the routed experts' norms on the inputs (float64).

        Args:
            x: (N, D) layer inputs.
            norms: (N, E) true expert output norms.
            moe: the layer (unused beyond the shapes: the fit needs only x and norms).
        """
        first = self.unscored
        weight, bias = ridge_regression(x, norms[:, first:], self.ridge)  # (D, E_r), (E_r,)
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()
            self.weight[first:] = weight.t().to(self.weight.dtype)
            self.bias[first:] = bias.to(self.bias.dtype)

    def score_layers(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(self.weight, self.bias)]

    def flops_per_token(self, d_model: int) -> float:
        # one dot product, one bias add and one clamp per routed expert
        return self.routed * (2.0 * d_model + 2)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "ridge": self.ridge}

    @classmethod
    def _shape_settings(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {**super()._shape_settings(data), "ridge": data.get("ridge", DEFAULT_RIDGE)}

    @classmethod
    def config_settings(cls, config: Any) -> dict[str, Any]:
        return {"ridge": config.ridge}


def neuron_norm_correlation(
    moe: MoEFFN, x: torch.Tensor, norms: torch.Tensor, *, first: int = 0
) -> torch.Tensor:
    """Pearson correlation, over tokens, of each neuron's contribution with its expert's norm.

    The contribution of neuron j is ``|h_j| * ||W_down[:, j]||``; statistics stream over chunks
    of :data:`FIT_CHUNK` tokens in float64.

    Args:
        moe: the MoE layer.
        x: (N, D) inputs.
        norms: (N, E) true expert output norms.
        first: experts before this one (the shared ones) are left out.

    Returns:
        (E - first, S) correlations; constant contributions get -2, padding slots -3.

    Example:
        >>> best = neuron_norm_correlation(moe, x, moe.expert_norms(x)).argmax(dim=-1)
    """
    S, D = moe.expert_size, moe.d_model
    w_in = moe.w_in[first:].detach().float()  # (E_r, S_in, D)
    b_in = None if moe.b_in is None else moe.b_in[first:].detach().float().flatten()
    down = moe.w_out[first:].detach().float().norm(dim=-1)  # (E_r, S)
    stats = torch.zeros(5, *down.shape, dtype=torch.float64, device=down.device)
    n = x.shape[0]
    for start in range(0, n, FIT_CHUNK):
        chunk = x[start : start + FIT_CHUNK].to(w_in.device, torch.float32)  # (n, D)
        pre = Fn.linear(chunk, w_in.reshape(-1, D), b_in).unflatten(-1, w_in.shape[:2])
        hidden = moe.act(pre[..., :S]) * pre[..., S:] if moe.gated else moe.act(pre)
        c = (hidden.abs() * down).double()  # (n, E_r, S)
        t = norms[start : start + FIT_CHUNK, first:].to(c.device).double().unsqueeze(-1)
        for i, part in enumerate((c, c * c, t.expand_as(c), t * t, c * t)):
            stats[i] += part.sum(dim=0)
    mean_c, mean_cc, mean_t, mean_tt, mean_ct = stats / max(n, 1)
    var_c = (mean_cc - mean_c**2).clamp_min(0)
    var_t = (mean_tt - mean_t**2).clamp_min(0)
    spread = (var_c * var_t).sqrt()
    tiny = torch.finfo(torch.float64).tiny
    correlation = torch.where(
        spread > tiny, (mean_ct - mean_c * mean_t) / spread.clamp_min(tiny), _NO_VARIANCE
    )
    return torch.where(moe.perm[first:] >= 0, correlation, _PADDING).float()


def ridge_regression(
    x: torch.Tensor, y: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias minimising ``||y - x W - b||^2 + lam ||W||^2``, in float64.

    ``lam`` is ``ridge`` times the mean diagonal of the centred ``X^T X`` (scale-free); the bias
    is not penalised. A singular system (``ridge`` 0, fewer tokens than D) gets the
    minimum-norm solution.

    Args:
        x: (N, D) inputs.
        y: (N, O) targets.
        ridge: relative ridge strength, >= 0.

    Returns:
        (D, O) weights and (O,) bias, float64.

    Example:
        >>> weight, bias = ridge_regression(x, norms, 1e-3)
    """
    x, y = x.double(), y.to(x.device).double()
    mean_x, mean_y = x.mean(dim=0), y.mean(dim=0)  # (D,), (O,)
    xc, yc = x - mean_x, y - mean_y
    gram = xc.t() @ xc  # (D, D)
    lam = ridge * float(gram.diagonal().mean())
    system = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    rhs = xc.t() @ yc  # (D, O)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0 and lam > 0:
        weight = torch.cholesky_solve(rhs, factor)
    else:  # singular or unregularised: pseudo-inverse through the eigendecomposition
        values, vectors = torch.linalg.eigh(system)
        cutoff = values.abs().max() * gram.shape[0] * torch.finfo(values.dtype).eps
        inverse = torch.where(values > cutoff, 1.0 / values, torch.zeros_like(values))
        weight = vectors @ (inverse.unsqueeze(-1) * (vectors.t() @ rhs))
    return weight, mean_y - mean_x @ weight
