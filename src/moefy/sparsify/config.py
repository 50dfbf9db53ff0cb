"""The base configs of the training-free sparsity methods, their validators, the registry of
methods and the JSON round trip.

Each method's own config class lives beside its handler in ``moefy.sparsify.methods.<name>``,
registered there with :func:`moefy.sparsify.methods.register_sparsify_method`;
:data:`SPARSIFY_METHODS` imports the built-in ones on its first lookup, so this module imports
none of them (and no torch). :func:`config_from_dict` reads back what
:meth:`SparsifyConfig.to_dict` wrote (the ``method`` key names the registered method).

Example:
    >>> from moefy.sparsify import TEALConfig
    >>> config = TEALConfig(sparsity=0.5)
    >>> config_from_json(config.to_json()) == config
    True
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from moefy.errors import MoefyError
from moefy.jsonconfig import JsonConfig, loads_json
from moefy.registry import Registry
from moefy.validate import check_bool, check_choice, check_fraction, check_int

CONFIG_VERSION = 1
DEFAULT_BATCH_SIZE = 8
DEFAULT_MIN_CALIBRATION_TOKENS = 1024
DEFAULT_CALIBRATION_PASSES = 2
DEFAULT_GREEDY_STEP = 0.05
# Leading positions of each block whose output error the greedy search leaves out: the
# attention-sink tokens (StreamingLLM keeps 4), whose FFN outputs are orders of magnitude larger
# than the rest and would otherwise decide every step.
DEFAULT_GREEDY_SINK_POSITIONS = 4
DEFAULT_GREEDY_TOKENS = 256
# What a centred method subtracts from each input channel before its threshold (SCAP): nothing,
# or the channel's mode, median or mean on calibration text.
CENTRES = ("none", "mode", "median", "mean")
# How a layerwise method spreads its target: see LayerwiseConfig.budget.
BUDGET_RULES = ("block", "global", "tail")
BUILTIN_METHODS_PACKAGE = "moefy.sparsify.methods"


def _load_builtin_methods() -> None:
    importlib.import_module(BUILTIN_METHODS_PACKAGE)  # each method module registers itself


# method name -> handler; ``meta``: config_cls, cli_options, sweep_levels (see
# moefy.sparsify.methods.register_sparsify_method, which fills it).
SPARSIFY_METHODS: Registry[Any] = Registry("sparsify method", load=_load_builtin_methods)


def config_class(method: str) -> type[SparsifyConfig]:
    """The config class registered for ``method``; a one-line error with a close match otherwise.

    Example:
        >>> config_class("teal").__name__
        'TEALConfig'
    """
    return SPARSIFY_METHODS.get(method).meta["config_cls"]


class _ConfigClasses(Mapping):
    """Method name -> config class, read live from :data:`SPARSIFY_METHODS`."""

    def __getitem__(self, method: str) -> type[SparsifyConfig]:
        if method not in SPARSIFY_METHODS:
            raise KeyError(method)
        return config_class(method)

    def __iter__(self) -> Iterator[str]:
        return iter(SPARSIFY_METHODS.names())

    def __len__(self) -> int:
        return len(SPARSIFY_METHODS)


CONFIG_CLASSES: Mapping[str, type[SparsifyConfig]] = _ConfigClasses()


def __getattr__(name: str) -> Any:
    """Registered config classes by class name (``from moefy.sparsify.config import TEALConfig``
    keeps working now that each lives in its method's module)."""
    for cls in CONFIG_CLASSES.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def positive_int(text: str) -> int:
    """Parse a whole number > 0 from an option's text (``moefy`` options and
    :attr:`moefy.sparsify.methods.MethodOption.parse`).

    Raises:
        ValueError: not a whole number, or not > 0 (a one-line message; the CLI shows it as a
            usage error through :func:`moefy.cli.args.argparse_type`).

    Example:
        >>> positive_int("8")
        8
    """
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def sparsity_for_keep(keep: float) -> float:
    """The ``sparsity`` of a threshold method that keeps the share ``keep`` of its activations.

    ``keep`` is what the sweep and the MoE methods take (the share of the FFN kept per token);
    the threshold configs keep the papers' ``sparsity`` (the share skipped). Rounded to six
    decimals so that ``keep=0.65`` gives ``sparsity=0.35``, not ``0.35000000000000003``.

    Args:
        keep: share kept, in (0, 1].

    Returns:
        ``1 - keep``, in [0, 1).

    Raises:
        MoefyError: ``keep`` outside (0, 1].

    Example:
        >>> sparsity_for_keep(0.65)
        0.35
    """
    check_fraction("keep", keep, zero=False, one=True)
    return round(1.0 - keep, 6)


@dataclass(frozen=True)
class SparsifyConfig(JsonConfig):
    """Fields every method shares.

    Attributes:
        sparsity: target share of the method's activations set to zero, in [0, 1). 0 keeps the
            model dense (thresholds of zero remove only exact zeros).
        version: config format version (written to saved models).
    """

    method: ClassVar[str] = ""

    sparsity: float = 0.5
    version: int = CONFIG_VERSION

    VERSION: ClassVar[int] = CONFIG_VERSION

    def __post_init__(self) -> None:
        check_fraction("sparsity", self.sparsity)
        check_int("version", self.version, minimum=1)
        self.check_version()

    @property
    def needs_calibration(self) -> bool:
        """Whether this config's thresholds (or centres) come from calibration text; a property
        of the instance, since a setting can decide it (a centred top-k calibrates)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict, ``method`` first (the key
        :func:`config_from_dict` dispatches on)."""
        return {"method": self.method, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsifyConfig:
        """Rebuild a config from :meth:`to_dict` output (the registered class its ``method``
        names, which must be ``cls`` or a subclass of it; without ``method``, ``cls``'s own).

        Example:
            >>> TEALConfig.from_dict({"sparsity": 0.4}) == TEALConfig(sparsity=0.4)
            True
        """
        if isinstance(data, dict) and "method" not in data and cls.method:
            data = {"method": cls.method, **data}
        config = config_from_dict(data)
        if not isinstance(config, cls):
            raise MoefyError(f"{cls.__name__}.from_dict got a {config.method} config")
        return config

    @classmethod
    def from_json(cls, text: str) -> SparsifyConfig:
        """Rebuild a config from :meth:`to_json` output."""
        return cls.from_dict(_parse_json(text))

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

    batch_size: int = DEFAULT_BATCH_SIZE
    min_calibration_tokens: int = DEFAULT_MIN_CALIBRATION_TOKENS
    calibration_passes: int = DEFAULT_CALIBRATION_PASSES

    @property
    def needs_calibration(self) -> bool:
        return True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "min_calibration_tokens", "calibration_passes"):
            check_int(name, getattr(self, name), minimum=1)


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
        greedy_sink_positions: leading positions of every block left out of that error. The
            first tokens of a sequence (attention sinks) have FFN outputs far larger than the
            rest; counted, they hold almost all of the summed error and the search optimises for
            them alone (on SmolLM2-135M: 96-97 % of a block's error from position 0). 0 counts
            every position.
        budget: how the target is spread over blocks. ``block``: each block skips
            ``sparsity`` of its weights (inside it, the greedy search or one sparsity).
            ``global``: one FLOPs budget over every sparsified projection of every block: the
            greedy search runs in each block to full sparsity, recording its error relative to
            the residual stream after the block, token by token; blocks are then given the
            sparsity where the least error is added per skipped weight (needs ``greedy``).
            ``tail``: per projection from its weight's heavy-tail exponent (ActTail: the
            power-law alpha of the eigenvalues of W^T W; heavier tails skip less), no search.
            Every rule raises the skipped share to pay for wrappers' ``overhead_weights``.
        centre: what to subtract from each input channel before its threshold, ``W @ centre``
            being added back as a bias (SCAP): ``"none"``, or the channel's ``"mode"``,
            ``"median"`` or ``"mean"`` on the calibration text (sink positions left out).
    """

    attention: bool = False
    greedy: bool = True
    greedy_step: float = DEFAULT_GREEDY_STEP
    greedy_tokens: int = DEFAULT_GREEDY_TOKENS
    greedy_sink_positions: int = DEFAULT_GREEDY_SINK_POSITIONS
    budget: str = "block"
    centre: str = "none"

    # whether the method's wrappers subtract a centre (rotate and lowrank do not yet)
    takes_centre: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("attention", "greedy"):
            check_bool(name, getattr(self, name))
        check_choice("budget", self.budget, BUDGET_RULES)
        check_choice("centre", self.centre, CENTRES)
        if self.centre != "none" and not self.takes_centre:
            raise MoefyError(
                f"{self.method} does not combine with centring yet: leave centre='none' "
                "(centre works with teal, wina, scap and topk)"
            )
        if self.budget == "global" and not self.greedy:
            raise MoefyError("budget='global' is allocated by the greedy search: keep greedy on")
        check_fraction("greedy_step", self.greedy_step, zero=False)
        check_int("greedy_tokens", self.greedy_tokens, minimum=1)
        check_int("greedy_sink_positions", self.greedy_sink_positions, minimum=0)


def config_from_dict(data: dict[str, Any]) -> SparsifyConfig:
    """Rebuild a config from :meth:`SparsifyConfig.to_dict` output.

    Raises:
        MoefyError: unknown method or fields, or invalid values.

    Example:
        >>> config_from_dict({"method": "teal", "sparsity": 0.5})
        TEALConfig(sparsity=0.5, ...)
    """
    if not isinstance(data, dict):
        raise MoefyError(f"a sparsify config must be a JSON object, got {type(data).__name__}")
    fields = dict(data)
    method = fields.pop("method", None)
    if not isinstance(method, str):
        names = ", ".join(SPARSIFY_METHODS.names())
        raise MoefyError(f"unknown sparsify method {method!r}; known: {names}")
    cls = config_class(method)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise MoefyError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    try:
        return cls(**fields)
    except TypeError as err:
        raise MoefyError(f"bad {cls.__name__}: {err}") from None


SPEC_SEPARATOR = ":"


def split_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``teal:attention=true:budget=global`` -> ``("teal", {"attention": True, "budget":
    "global"})``: a method name with some config fields set (values read as JSON, else as text).
    The sweep and ``moefy bench`` take methods this way.

    Raises:
        MoefyError: a part that is not ``FIELD=VALUE``.

    Example:
        >>> split_method_spec("wina:attention=true")
        ('wina', {'attention': True})
    """
    base, *parts = spec.split(SPEC_SEPARATOR)
    fields: dict[str, Any] = {}
    for part in parts:
        name, sep, text = part.partition("=")
        if not sep or not name or not text:
            raise MoefyError(
                f"{spec!r}: each part after {SPEC_SEPARATOR!r} sets a config field as "
                f"FIELD=VALUE, got {part!r} (e.g. teal{SPEC_SEPARATOR}attention=true)"
            )
        try:
            fields[name] = json.loads(text)
        except ValueError:
            fields[name] = text
    return base, fields


def config_from_spec(spec: str, **fields: Any) -> SparsifyConfig:
    """The config a method spec (:func:`split_method_spec`) names, with ``fields`` set too.

    Example:
        >>> config_from_spec("teal:attention=true", sparsity=0.5)
        TEALConfig(sparsity=0.5, ..., attention=True, ...)
    """
    method, given = split_method_spec(spec)
    return config_from_dict({"method": method, **given, **fields})


def config_from_json(text: str) -> SparsifyConfig:
    """Rebuild a config from :meth:`SparsifyConfig.to_json` output."""
    return config_from_dict(_parse_json(text))


def _parse_json(text: str) -> Any:
    try:
        return loads_json(text)
    except json.JSONDecodeError as err:
        raise MoefyError(f"sparsify config is not valid JSON: {err}") from None
