"""The result of profiling: per-layer sparsity summaries, the raw sums behind them, activation
rates and patterns, and the co-activation counts, saved to and loaded from one folder (files:
:mod:`moefy.profiling.storage`).

Shape legend:
    F: FFN width (d_ff) of a layer, K: |h| histogram bins, P: contribution shares,
    C: chunk sizes, S: sampled tokens of the activation patterns
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from moefy.dist import is_main_process
from moefy.errors import MoefyError
from moefy.profiling.accumulators import fraction_below, histogram_quantile
from moefy.profiling.config import ProfileConfig
from moefy.profiling.fingerprint import model_fingerprint
from moefy.profiling.layer_summary import LayerSparsity, summarise, table_rows
from moefy.profiling.patterns import decode_patterns, encode_patterns
from moefy.profiling.storage import (
    ARRAYS_FILE,
    COACTIVATION_FILE,
    PATTERNS_FILE,
    PROFILE_FORMAT,
    PROFILE_VERSION,
    RATE_SUMS,
    SUMMARY_FILE,
    read_profile,
    write_profile,
)

__all__ = [
    "ARRAYS_FILE",
    "COACTIVATION_FILE",
    "PATTERNS_FILE",
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "SUMMARY_FILE",
    "LayerSparsity",
    "SparsityProfile",
    "model_fingerprint",
]


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
        path: the folder it was loaded from or last saved to, or None.

    Example:
        >>> result = profile(model, blocks)
        >>> result.layers[0].contribution_fraction[0.9]
        0.41
        >>> result.save("runs/profile")
        >>> SparsityProfile.load("runs/profile").coactivation(3).shape  # with coactivation=True
        torch.Size([1536, 1536])
        >>> result.activation_rate(3).shape, result.activation_patterns(3).shape
        (torch.Size([1536]), torch.Size([1536, 512]))
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
        patterns: list[torch.Tensor] | None = None,
        patterns_file: Path | None = None,
        path: Path | None = None,
    ) -> None:
        if len(layer_names) != len(layer_sums):
            raise MoefyError("SparsityProfile: one name per layer of sums is needed")
        if patterns is not None and len(patterns) != len(layer_sums):
            raise MoefyError("SparsityProfile: one (F, S) pattern array per layer is needed")
        self.path = path
        # kept as stored on disk (float16, scaled), so a profile in memory and the same profile
        # loaded back give bitwise the same patterns, in half the memory
        self._patterns = None if patterns is None else [encode_patterns(p) for p in patterns]
        self._patterns_file = patterns_file
        self.config = config
        self.fingerprint = dict(fingerprint)
        self.data = dict(data or {})
        self._sums = layer_sums
        self._coactivation = coactivation
        self._coactivation_file = coactivation_file
        self.layers = [
            summarise(i, name, sums, config)
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

    # ------------------------------------------------------------------ activation rates

    @property
    def has_activation_rates(self) -> bool:
        """Whether the profile holds activation rates and contribution shares (a profile made
        before moefy measured them does not)."""
        return bool(self._sums) and all(name in self._sums[0] for name in RATE_SUMS)

    def _rate_sums(self, layer_index: int) -> dict[str, torch.Tensor]:
        layer_index = self._layer(layer_index)
        if not self.has_activation_rates:
            where = f"the profile at {self.path}" if self.path is not None else "this profile"
            raise MoefyError(
                f"{where} has no activation rates (made by an older moefy); re-run moefy profile"
            )
        return self._sums[layer_index]

    def activation_rate(self, layer_index: int) -> torch.Tensor:
        """(F,) float32 share of tokens for which each neuron is "top": its |h| among the
        token's ``ceil(config.top_share * F)`` largest.

        Example:
            >>> shared = profile.activation_rate(0).argsort(descending=True)[:192]
        """
        sums = self._rate_sums(layer_index)
        return (sums["top_counts"] / max(float(sums["tokens"]), 1.0)).float()

    def contribution_share(self, layer_index: int) -> torch.Tensor:
        """(F,) float32 mean over tokens of each neuron's share ``c_j / sum(c)`` of the FFN's
        output mass, ``c_j = |h_j| * ||W_down[:, j]||`` (the shares sum to 1 over neurons).

        Example:
            >>> profile.contribution_share(0).sum()
            tensor(1.0000)
        """
        sums = self._rate_sums(layer_index)
        return (sums["contribution_share"] / max(float(sums["tokens"]), 1.0)).float()

    @property
    def pattern_tokens(self) -> int:
        """S, the number of sampled tokens of :meth:`activation_patterns` (0 when none)."""
        if self._patterns is not None:
            return self._patterns[0].shape[1] if self._patterns else 0
        if self._patterns_file is None:
            return 0
        with safe_open(str(self._patterns_file), framework="pt") as file:
            return file.get_slice("layer.0").get_shape()[1]

    def activation_patterns(self, layer_index: int) -> torch.Tensor:
        """(F, S) float32: per neuron, its share ``c_j / sum(c)`` on each of S sampled tokens
        (evenly spaced over the profiled tokens, the same for every layer; see
        :mod:`moefy.profiling.patterns`). Read from disk one layer at a time for a loaded
        profile (values kept as float16, about 3 significant digits, in memory and on disk).

        Args:
            layer_index: the FFN layer.

        Returns:
            A new CPU tensor.

        Example:
            >>> rows = profile.activation_patterns(0)  # (1536, 512)
        """
        self._rate_sums(layer_index)
        if self._patterns is not None:
            return decode_patterns(self._patterns[layer_index])
        if self._patterns_file is None:
            raise MoefyError(
                "this profile stores no activation patterns (profiled with pattern_tokens=0); "
                "re-run moefy profile with --pattern-tokens 512"
            )
        try:
            with safe_open(str(self._patterns_file), framework="pt") as file:
                return decode_patterns(file.get_tensor(f"layer.{layer_index}"))
        except (OSError, SafetensorError) as err:
            raise MoefyError(
                f"cannot read activation patterns of layer {layer_index} from "
                f"{self._patterns_file}: {err}"
            ) from None

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
        """One row per layer for a printed table (percentages); see :func:`table_rows`."""
        return table_rows(self.layers, self.config)

    def summary(self) -> dict[str, Any]:
        """The JSON content of ``summary.json``."""
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "data": self.data,
            "has_coactivation": self.has_coactivation,
            "has_patterns": self._patterns is not None or self._patterns_file is not None,
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
        write_profile(
            path,
            self.summary(),
            self._sums,
            coactivation=self._coactivation,
            coactivation_file=self._coactivation_file,
            overwrite=overwrite,
            patterns=self._patterns,
            patterns_file=self._patterns_file,
        )
        if self._coactivation is None and self._coactivation_file is not None:
            self._coactivation_file = path / COACTIVATION_FILE
        if self._patterns is None and self._patterns_file is not None:
            self._patterns_file = path / PATTERNS_FILE
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparsityProfile:
        """Read a profile folder written by :meth:`save`.

        Args:
            path: the folder.

        Returns:
            The profile; co-activation counts and activation patterns stay on disk until
            :meth:`coactivation` / :meth:`activation_patterns` ask.

        Raises:
            MoefyError: the folder is missing, incomplete or corrupt, or was written by a newer
                moefy.

        Example:
            >>> SparsityProfile.load("runs/profile").table_rows()[0]["active %"]
        """
        stored = read_profile(path)
        return cls(
            config=stored.config,
            fingerprint=stored.fingerprint,
            layer_names=stored.layer_names,
            layer_sums=stored.layer_sums,
            data=stored.data,
            coactivation_file=stored.coactivation_file,
            patterns_file=stored.patterns_file,
            path=Path(path),
        )
