"""One dataclass config per training-free sparsity method, with validation and a JSON round trip.

The CLI, a recipe file and Python build the same objects; :func:`config_from_dict` reads back what
:meth:`SparsifyConfig.to_dict` wrote (the ``method`` key names the class).

Example:
    >>> config = TEALConfig(sparsity=0.5)
    >>> config_from_json(config.to_json()) == config
    True
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from moefy.errors import MoefyError
from moefy.jsonconfig import loads_json

CONFIG_VERSION = 1
DEFAULT_BATCH_SIZE = 8
DEFAULT_MIN_CALIBRATION_TOKENS = 1024
DEFAULT_CALIBRATION_PASSES = 2
DEFAULT_GREEDY_STEP = 0.05
DEFAULT_GREEDY_TOKENS = 256

# method name -> config class; filled by @_register_config below.
CONFIG_CLASSES: dict[str, type[SparsifyConfig]] = {}


def _register_config(cls: type[SparsifyConfig]) -> type[SparsifyConfig]:
    CONFIG_CLASSES[cls.method] = cls
    return cls


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MoefyError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_fraction(name: str, value: object, *, allow_zero: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (0.0 <= value < 1.0) if allow_zero else (0.0 < value < 1.0)
    if not ok:
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise MoefyError(f"{name} must be a number in {interval}, got {value!r}")


@dataclass(frozen=True)
class SparsifyConfig:
    """Fields every method shares.

    Attributes:
        sparsity: target share of the method's activations set to zero, in [0, 1). 0 keeps the
            model dense (thresholds of zero remove only exact zeros).
        version: config format version (written to saved models).
    """

    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    sparsity: float = 0.5
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check_fraction("sparsity", self.sparsity)
        _check_int("version", self.version, 1)
        if self.version > CONFIG_VERSION:
            raise MoefyError(
                f"{type(self).__name__} version {self.version} is newer than this moefy "
                f"understands ({CONFIG_VERSION}): upgrade moefy"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict, ``method`` first."""
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes: Any) -> SparsifyConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CalibratedConfig(SparsifyConfig):
    """Fields of the methods whose thresholds come from calibration text.

    Attributes:
        batch_size: blocks per forward pass during calibration.
        min_calibration_tokens: calibration text shorter than this is refused, because
            thresholds estimated from it would not hold on other text.
        calibration_passes: passes over the calibration text. The first reads the dense model;
            each further pass re-estimates every threshold with all thresholds of the previous
            pass in place, so that a layer is calibrated on the inputs it will see in the sparse
            model (sparsifying early layers shrinks and shifts the activations of later ones).
    """

    needs_calibration: ClassVar[bool] = True

    batch_size: int = DEFAULT_BATCH_SIZE
    min_calibration_tokens: int = DEFAULT_MIN_CALIBRATION_TOKENS
    calibration_passes: int = DEFAULT_CALIBRATION_PASSES

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("batch_size", self.batch_size, 1)
        _check_int("min_calibration_tokens", self.min_calibration_tokens, 1)
        _check_int("calibration_passes", self.calibration_passes, 1)


@dataclass(frozen=True)
class LayerwiseConfig(CalibratedConfig):
    """Fields of the methods that threshold the input of every targeted linear layer.

    Attributes:
        attention: also sparsify the inputs of the attention projections (q, k, v, o).
        greedy: spread the target unevenly over the linear layers of each block with TEAL's
            greedy search (each step sparsifies the layer whose step costs the least block output
            error per skipped weight); every block still skips ``sparsity`` of its weights.
            False gives every linear layer the same sparsity.
        greedy_step: sparsity added to one layer per greedy step.
        greedy_tokens: calibration tokens on which the greedy search measures output error (the
            first blocks of the calibration text, kept in memory for the search).
    """

    attention: bool = False
    greedy: bool = True
    greedy_step: float = DEFAULT_GREEDY_STEP
    greedy_tokens: int = DEFAULT_GREEDY_TOKENS

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("attention", "greedy"):
            if not isinstance(getattr(self, name), bool):
                raise MoefyError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_fraction("greedy_step", self.greedy_step, allow_zero=False)
        _check_int("greedy_tokens", self.greedy_tokens, 1)


@_register_config
@dataclass(frozen=True)
class TopKConfig(SparsifyConfig):
    """Top-k neurons (the Lazy Neuron Phenomenon): keep the ``k`` largest FFN activations per token.

    The activations are the input of the down projection; ``k = d_ff - round(sparsity * d_ff)``.
    Needs no calibration. Only the down projection's columns are skipped: the ranking needs every
    activation, so the up (and gate) projections run in full.

    Example:
        >>> TopKConfig(sparsity=0.75)
    """

    method: ClassVar[str] = "topk"


@_register_config
@dataclass(frozen=True)
class TEALConfig(LayerwiseConfig):
    """TEAL: magnitude thresholds on the inputs of the FFN's (optionally attention's) linear layers.

    Entry ``x_i`` of a linear layer's input is zeroed when ``|x_i| <= t``; each layer's ``t`` is
    the quantile of ``|x|`` on calibration text that zeroes the layer's allocated share.

    Example:
        >>> TEALConfig(sparsity=0.5, attention=True)
    """

    method: ClassVar[str] = "teal"


@_register_config
@dataclass(frozen=True)
class WINAConfig(LayerwiseConfig):
    """WINA: zero ``x_i`` when ``|x_i| * ||W[:, i]||_2 <= t`` (activation times its column's norm).

    ``t`` per layer is calibrated like TEAL's; stored as one threshold per input channel,
    ``t / ||W[:, i]||``.

    Example:
        >>> WINAConfig(sparsity=0.5)
    """

    method: ClassVar[str] = "wina"


@_register_config
@dataclass(frozen=True)
class CATSConfig(CalibratedConfig):
    """CATS: zero neuron ``i`` when ``|act(gate_i(x))| <= t``; up and down then skip it.

    Only for gated FFNs. ``t`` per layer is the quantile of ``|act(gate(x))|`` that zeroes
    ``sparsity`` of the neurons on calibration text.

    Example:
        >>> CATSConfig(sparsity=0.5)
    """

    method: ClassVar[str] = "cats"


@_register_config
@dataclass(frozen=True)
class CHESSConfig(CalibratedConfig):
    """CHESS channel-wise thresholding: one threshold per FFN neuron.

    Neuron ``i`` is zeroed when ``|act(gate_i(x))| * E|up_i(x)| <= t``, with ``E|up_i|`` the mean
    magnitude of the neuron's up activation on calibration text; stored as the per-neuron
    threshold ``t / E|up_i|``. Only for gated FFNs; up and down skip the zeroed neurons.

    Example:
        >>> CHESSConfig(sparsity=0.5)
    """

    method: ClassVar[str] = "chess"


def config_from_dict(data: dict[str, Any]) -> SparsifyConfig:
    """Rebuild a config from :meth:`SparsifyConfig.to_dict` output.

    Raises:
        MoefyError: unknown method or fields, or invalid values.
    """
    if not isinstance(data, dict):
        raise MoefyError(f"a sparsify config must be a JSON object, got {type(data).__name__}")
    fields = dict(data)
    method = fields.pop("method", None)
    cls = CONFIG_CLASSES.get(method)  # type: ignore[arg-type]
    if cls is None:
        raise MoefyError(
            f"unknown sparsify method {method!r}: use one of {', '.join(sorted(CONFIG_CLASSES))}"
        )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise MoefyError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    try:
        return cls(**fields)
    except TypeError as err:
        raise MoefyError(f"bad {cls.__name__}: {err}") from None


def config_from_json(text: str) -> SparsifyConfig:
    """Rebuild a config from :meth:`SparsifyConfig.to_json` output."""
    try:
        data = loads_json(text)
    except json.JSONDecodeError as err:
        raise MoefyError(f"sparsify config is not valid JSON: {err}") from None
    return config_from_dict(data)
