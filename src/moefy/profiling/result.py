"""The result of profiling: per-layer sparsity summaries, the raw sums behind them, and the
co-activation counts, saved to and loaded from one folder.

Shape legend:
    F: FFN width (d_ff) of a layer, K: |h| histogram bins, P: contribution shares,
    C: chunk sizes

Folder layout (written atomically by :meth:`SparsityProfile.save`):
    summary.json              version, config, model fingerprint, data, per-layer summaries
    arrays.safetensors        the float64 accumulator sums, keys ``layer.{i}.{name}``
    coactivation.safetensors  only with ``coactivation=True``: (F, F) float64 per layer,
                              keys ``layer.{i}``; read one layer at a time, never at load
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from moefy.arch import find_ffns, model_type_of
from moefy.dist import is_main_process
from moefy.errors import MoefyError
from moefy.io import FOLDER, atomic_path
from moefy.jsonconfig import loads_json
from moefy.profiling.accumulators import fraction_below, histogram_quantile
from moefy.profiling.config import ProfileConfig

PROFILE_VERSION = 1
PROFILE_FORMAT = "moefy.sparsity_profile"
SUMMARY_FILE = "summary.json"
ARRAYS_FILE = "arrays.safetensors"
COACTIVATION_FILE = "coactivation.safetensors"
_PERCENT = 100.0
# the contribution shares shown in the printed table (when the config measured them)
_TABLE_SHARES = (0.5, 0.9, 0.99)
_TABLE_CHUNK = 16


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a model's FFN layout: checked before a profile is applied to a model.

    Args:
        model: a supported model.

    Returns:
        ``{"model_type", "num_layers", "d_model", "d_ff" (list, one per layer), "model_name"}``;
        ``model_name`` is ``config.name_or_path`` or ``""``.

    Example:
        >>> model_fingerprint(model)["d_ff"][:2]
        [1536, 1536]
    """
    sites = find_ffns(model)
    weights = [site.weights() for site in sites]
    config = getattr(model, "config", None)
    return {
        "model_type": model_type_of(model),
        "num_layers": len(sites),
        "d_model": weights[0].d_model,
        "d_ff": [w.d_ff for w in weights],
        "model_name": str(getattr(config, "name_or_path", "") or ""),
    }


@dataclass(frozen=True)
class LayerSparsity:
    """The sparsity of one FFN layer, summarised over all profiled tokens.

    Attributes:
        index: layer number (encoder first for encoder-decoder models).
        name: module path of the FFN.
        d_ff: F, the number of neurons.
        tokens: tokens seen.
        rms: root mean square of h over all tokens and neurons.
        exact_zero_fraction: fraction of h that is exactly 0.
        below_rms_fraction: ``{t: fraction of |h| < t * rms}`` for the config's rms_thresholds
            (to within one histogram bin, see ``moefy.profiling.accumulators``).
        contribution_fraction: ``{p: mean over tokens of the fraction of neurons in the smallest
            set carrying share p of sum(|h_i| * ||W_down[:, i]||)}``.
        active_fraction: mean over tokens of the fraction of active neurons (config rule).
        chunk_union_fraction: ``{n: mean over chunks of n consecutive tokens of the fraction of
            neurons active for at least one of them}``; ``None`` when the blocks are shorter
            than n.
        hot_fraction: fraction of neurons (the most frequently active) that carries
            ``hot_share`` of all activations.
        never_active: neurons never active.
        hot_neurons: ids of the most frequently active neurons, most frequent first.
    """

    index: int
    name: str
    d_ff: int
    tokens: int
    rms: float
    exact_zero_fraction: float
    below_rms_fraction: dict[float, float]
    contribution_fraction: dict[float, float]
    active_fraction: float
    chunk_union_fraction: dict[int, float | None]
    hot_fraction: float
    never_active: int
    hot_neurons: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (dict keys become strings)."""
        out = asdict(self)
        for key in ("below_rms_fraction", "contribution_fraction", "chunk_union_fraction"):
            out[key] = {f"{k:g}": v for k, v in out[key].items()}
        out["hot_neurons"] = list(self.hot_neurons)
        return out


def _summarise(
    index: int, name: str, sums: dict[str, torch.Tensor], config: ProfileConfig
) -> LayerSparsity:
    """One layer's summary from its accumulated sums (see ``LayerAccumulator``)."""
    F = sums["firing_counts"].numel()
    tokens = float(sums["tokens"])
    values = max(tokens * F, 1.0)
    rms = math.sqrt(float(sums["sum_squares"]) / values)
    counts = torch.arange(F + 1, dtype=torch.float64)
    active_mean = float((counts * sums["active_count_histogram"]).sum()) / max(tokens, 1.0)
    chunk_union: dict[int, float | None] = {}
    for n, union, chunks in zip(
        config.chunk_sizes, sums["chunk_union"].tolist(), sums["chunk_count"].tolist(), strict=True
    ):
        chunk_union[n] = union / (chunks * F) if chunks > 0 else None
    firing = sums["firing_counts"]  # (F,)
    order = torch.sort(firing, descending=True, stable=True).indices  # (F,)
    cumulative = firing[order].cumsum(0)  # (F,), exact: sums of whole numbers in float64
    total = float(cumulative[-1])
    if total > 0:
        target = torch.tensor([config.hot_share * total], dtype=torch.float64)
        hot_fraction = (int(torch.searchsorted(cumulative, target).item()) + 1) / F
    else:
        hot_fraction = 0.0
    hot = [int(i) for i in order[: config.num_hot] if firing[i] > 0]
    return LayerSparsity(
        index=index,
        name=name,
        d_ff=F,
        tokens=int(tokens),
        rms=rms,
        exact_zero_fraction=float(sums["exact_zeros"]) / values,
        below_rms_fraction={
            t: fraction_below(sums["abs_histogram"], t * rms) for t in config.rms_thresholds
        },
        contribution_fraction={
            p: float(needed) / values
            for p, needed in zip(config.shares, sums["contribution_needed"].tolist(), strict=True)
        },
        active_fraction=active_mean / F,
        chunk_union_fraction=chunk_union,
        hot_fraction=hot_fraction,
        never_active=int((firing == 0).sum()),
        hot_neurons=tuple(hot),
    )


class SparsityProfile:
    """Activation sparsity of every FFN layer of a model on some text.

    Built by :func:`moefy.profiling.profile`; saved with :meth:`save` and read back with
    :meth:`load`.

    Attributes:
        config: the :class:`ProfileConfig` it was measured with.
        fingerprint: the model's :func:`model_fingerprint` (model_type, num_layers, d_model,
            d_ff per layer, model_name).
        data: where the tokens came from (source, split, n_tokens, block_len).
        layers: one :class:`LayerSparsity` per FFN layer.

    Example:
        >>> result = profile(model, blocks)
        >>> result.layers[0].contribution_fraction[0.9]
        0.41
        >>> result.save("runs/profile")
        >>> SparsityProfile.load("runs/profile").coactivation(3).shape  # with coactivation=True
        torch.Size([1536, 1536])
    """

    def __init__(
        self,
        *,
        config: ProfileConfig,
        fingerprint: dict[str, Any],
        layer_names: list[str],
        layer_sums: list[dict[str, torch.Tensor]],
        data: dict[str, Any] | None = None,
        coactivation: list[torch.Tensor] | None = None,
        coactivation_file: Path | None = None,
    ) -> None:
        if len(layer_names) != len(layer_sums):
            raise MoefyError("SparsityProfile: one name per layer of sums is needed")
        self.config = config
        self.fingerprint = dict(fingerprint)
        self.data = dict(data or {})
        self._sums = layer_sums
        self._coactivation = coactivation
        self._coactivation_file = coactivation_file
        self.layers = [
            _summarise(i, name, sums, config)
            for i, (name, sums) in enumerate(zip(layer_names, layer_sums, strict=True))
        ]

    # ------------------------------------------------------------------ per-layer arrays

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def n_tokens(self) -> int:
        """Tokens profiled (each layer saw all of them)."""
        return self.layers[0].tokens if self.layers else 0

    def _layer(self, layer_index: int) -> int:
        if not isinstance(layer_index, int) or not 0 <= layer_index < self.num_layers:
            raise MoefyError(
                f"layer index {layer_index!r} out of range: "
                f"the profile has {self.num_layers} layers"
            )
        return layer_index

    def sums(self, layer_index: int) -> dict[str, torch.Tensor]:
        """The raw float64 accumulator sums of one layer (``tokens``, ``firing_counts`` (F,),
        ``active_count_histogram`` (F+1,), ``abs_histogram`` (K,), ...), without co-activation."""
        return dict(self._sums[self._layer(layer_index)])

    def firing_frequency(self, layer_index: int) -> torch.Tensor:
        """(F,) fraction of tokens for which each neuron is active."""
        sums = self._sums[self._layer(layer_index)]
        return sums["firing_counts"] / max(float(sums["tokens"]), 1.0)

    def active_count_histogram(self, layer_index: int) -> torch.Tensor:
        """(F+1,) number of tokens with 0, 1, ..., F active neurons."""
        return self._sums[self._layer(layer_index)]["active_count_histogram"].clone()

    def contribution_curve(self, layer_index: int) -> torch.Tensor:
        """(F+1,) mean over tokens of the contribution share carried by each token's k strongest
        neurons, k = 0..F (0 at k=0, 1 at k=F)."""
        sums = self._sums[self._layer(layer_index)]
        low_share = sums["contribution_low_share"] / max(float(sums["tokens"]), 1.0)  # (F,)
        # the k strongest carry what the F-k weakest do not
        curve = 1.0 - torch.cat([low_share.new_zeros(1), low_share]).flip(0)  # (F+1,)
        curve[0] = 0.0
        return curve.clamp_(0.0, 1.0)

    def fraction_below(self, layer_index: int, value: float) -> float:
        """Fraction of this layer's |h| below ``value`` (to within one histogram bin)."""
        return fraction_below(self._sums[self._layer(layer_index)]["abs_histogram"], value)

    def abs_quantile(self, layer_index: int, q: float) -> float:
        """The |h| value below which a fraction ``q`` of this layer's activations lie."""
        if not 0.0 <= q <= 1.0:
            raise MoefyError(f"quantile must be in [0, 1], got {q}")
        return histogram_quantile(self._sums[self._layer(layer_index)]["abs_histogram"], q)

    # ------------------------------------------------------------------ co-activation

    @property
    def has_coactivation(self) -> bool:
        return self._coactivation is not None or self._coactivation_file is not None

    def coactivation(self, layer_index: int) -> torch.Tensor:
        """(F, F) float64: entry (i, j) counts the tokens for which neurons i and j were both
        active (the diagonal is the firing count); ``A^T A`` of the (tokens, F) active mask.

        Read from ``coactivation.safetensors`` one layer at a time for a loaded profile.

        Args:
            layer_index: the FFN layer.

        Returns:
            A new CPU tensor.

        Example:
            >>> counts = SparsityProfile.load("runs/profile").coactivation(0)
        """
        layer_index = self._layer(layer_index)
        if self._coactivation is not None:
            return self._coactivation[layer_index].clone()
        if self._coactivation_file is None:
            raise MoefyError(
                "this profile has no co-activation counts; profile again with "
                "ProfileConfig(coactivation=True) (CLI: moefy profile --coactivation)"
            )
        try:
            with safe_open(str(self._coactivation_file), framework="pt") as file:
                return file.get_tensor(f"layer.{layer_index}")
        except (OSError, SafetensorError) as err:
            raise MoefyError(
                f"cannot read co-activation counts of layer {layer_index} from "
                f"{self._coactivation_file}: {err}"
            ) from None

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`MoefyError` if ``model``'s FFN layout differs from the profiled one.

        Compares model_type, num_layers, d_model and d_ff (not the name, which changes with the
        folder a model is loaded from).
        """
        theirs = model_fingerprint(model)
        for key in ("model_type", "num_layers", "d_model", "d_ff"):
            if theirs[key] != self.fingerprint.get(key):
                raise MoefyError(
                    f"this profile was measured on a different model: {key} is "
                    f"{self.fingerprint.get(key)!r} in the profile but {theirs[key]!r} in the model"
                )

    # ------------------------------------------------------------------ reporting

    def table_rows(self) -> list[dict[str, object]]:
        """One row per layer for a printed table (percentages).

        Columns: layer, zero % (exact zeros), neurons carrying 50/90/99 % of the contribution
        mass (the shares measured), mean active %, union % over chunks of 16 tokens (or the
        largest chunk size), the share of neurons carrying ``hot_share`` of all activations.
        """
        shares = [p for p in _TABLE_SHARES if p in self.config.shares] or list(self.config.shares)
        sizes = self.config.chunk_sizes
        chunk = _TABLE_CHUNK if _TABLE_CHUNK in sizes else max(sizes)
        rows = []
        for layer in self.layers:
            row: dict[str, object] = {
                "layer": layer.index,
                "zero %": _PERCENT * layer.exact_zero_fraction,
            }
            for p in shares:
                row[f"p{_PERCENT * p:g} neurons %"] = _PERCENT * layer.contribution_fraction[p]
            row["active %"] = _PERCENT * layer.active_fraction
            union = layer.chunk_union_fraction[chunk]
            row[f"chunk{chunk} union %"] = "-" if union is None else _PERCENT * union
            row[f"hot{_PERCENT * self.config.hot_share:g} neurons %"] = (
                _PERCENT * layer.hot_fraction
            )
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        """The JSON content of ``summary.json``."""
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "data": self.data,
            "has_coactivation": self.has_coactivation,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the profile to folder ``path`` atomically; rank 0 only.

        Args:
            path: the output folder.
            overwrite: replace ``path`` if moefy wrote it before (see :mod:`moefy.io`).

        Returns:
            ``Path(path)``.

        Example:
            >>> result.save("runs/profile")
        """
        path = Path(path)
        if not is_main_process():
            return path
        with atomic_path(path, FOLDER, overwrite=overwrite) as tmp:
            tmp.mkdir()
            arrays = {
                f"layer.{i}.{name}": tensor.contiguous()
                for i, sums in enumerate(self._sums)
                for name, tensor in sums.items()
            }
            save_file(arrays, str(tmp / ARRAYS_FILE), metadata={"format": PROFILE_FORMAT})
            if self._coactivation is not None:
                save_file(
                    {f"layer.{i}": c.contiguous() for i, c in enumerate(self._coactivation)},
                    str(tmp / COACTIVATION_FILE),
                )
            elif self._coactivation_file is not None:
                shutil.copyfile(self._coactivation_file, tmp / COACTIVATION_FILE)
            (tmp / SUMMARY_FILE).write_text(json.dumps(self.summary(), indent=2) + "\n")
        if self._coactivation is None and self._coactivation_file is not None:
            self._coactivation_file = path / COACTIVATION_FILE
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparsityProfile:
        """Read a profile folder written by :meth:`save`.

        Args:
            path: the folder.

        Returns:
            The profile; co-activation counts stay on disk until :meth:`coactivation` asks.

        Raises:
            MoefyError: the folder is missing, incomplete or corrupt, or was written by a newer
                moefy.

        Example:
            >>> SparsityProfile.load("runs/profile").table_rows()[0]["active %"]
        """
        path = Path(path)
        summary_file = path / SUMMARY_FILE
        if not summary_file.is_file():
            raise MoefyError(
                f"no sparsity profile at {path}: expected a folder with {SUMMARY_FILE} and "
                f"{ARRAYS_FILE}, written by 'moefy profile' or SparsityProfile.save"
            )
        try:
            summary = loads_json(summary_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MoefyError(
                f"{summary_file} is corrupt ({err}); profile the model again"
            ) from None
        if not isinstance(summary, dict) or summary.get("format") != PROFILE_FORMAT:
            raise MoefyError(f"{summary_file} is not a moefy sparsity profile")
        version = summary.get("version")
        if not isinstance(version, int) or version > PROFILE_VERSION:
            raise MoefyError(
                f"{path} was written by a newer moefy (profile version {version}; this moefy reads "
                f"up to {PROFILE_VERSION}): upgrade moefy"
            )
        try:
            config = ProfileConfig.from_dict(summary["config"])
            names = [layer["name"] for layer in summary["layers"]]
            fingerprint = dict(summary["fingerprint"])
            has_coactivation = bool(summary["has_coactivation"])
        except (KeyError, TypeError) as err:
            raise MoefyError(
                f"{summary_file} is incomplete (missing {err}); profile again"
            ) from None
        try:
            arrays = load_file(str(path / ARRAYS_FILE))
        except (OSError, SafetensorError) as err:
            raise MoefyError(
                f"{path / ARRAYS_FILE} is missing or corrupt ({err}); profile again"
            ) from None
        layer_sums: list[dict[str, torch.Tensor]] = [{} for _ in names]
        for key, tensor in arrays.items():
            _, index, name = key.split(".", 2)
            if not index.isdigit() or int(index) >= len(names):
                raise MoefyError(f"{path / ARRAYS_FILE} holds an unexpected array {key!r}")
            layer_sums[int(index)][name] = tensor
        expected = {"tokens", "firing_counts", "active_count_histogram", "abs_histogram"}
        for i, sums in enumerate(layer_sums):
            if not expected <= set(sums):
                raise MoefyError(
                    f"{path / ARRAYS_FILE} lacks the arrays of layer {i}; profile again"
                )
        coactivation_file = path / COACTIVATION_FILE if has_coactivation else None
        if coactivation_file is not None and not coactivation_file.is_file():
            raise MoefyError(f"{coactivation_file} is missing although {summary_file} lists it")
        return cls(
            config=config,
            fingerprint=fingerprint,
            layer_names=names,
            layer_sums=layer_sums,
            data=summary.get("data"),
            coactivation_file=coactivation_file,
        )
