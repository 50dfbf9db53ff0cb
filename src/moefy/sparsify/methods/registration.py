"""One call registers a training-free method everywhere: ``sparsify_``'s dispatch, the config
round trip, ``moefy sparsify``'s ``--method`` choices, help and options, and the sweep.

Example:
    >>> register_sparsify_method(
    ...     name="halfzero",
    ...     config_cls=HalfZeroConfig,  # a SparsifyConfig subclass with method = "halfzero"
    ...     handler=HalfZeroHandler(),  # a MethodHandler
    ...     help="zero the smaller half of every down projection's input",
    ... )
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from moefy.errors import MoefyError
from moefy.jsonconfig import is_number
from moefy.registry import Entry
from moefy.sparsify.config import (
    BUDGET_RULES,
    CENTRES,
    SPARSIFY_METHODS,
    SparsifyConfig,
    positive_int,
)
from moefy.sparsify.methods.base import MethodHandler

# keeps (shares of the FFN kept) a sweep evaluates when the user gives no levels
DEFAULT_SWEEP_LEVELS = (0.75, 0.5, 0.35)


@dataclass(frozen=True)
class MethodOption:
    """A ``moefy sparsify`` option that sets one config field of the methods that declare it.

    Attributes:
        flag: the option, ``--no-greedy``.
        field: the config field it sets, ``greedy``.
        help: what it does; ``--help`` prefixes the methods that take it.
        value: for a switch (``parse`` None), the field's value when the flag is given.
        parse: for an option that takes a value, ``text -> value`` (raises ValueError with a
            message for a bad value); the field keeps its default when the option is not given.

    Example:
        >>> MethodOption("--no-greedy", "greedy", "the same sparsity for every layer", value=False)
    """

    flag: str
    field: str
    help: str
    value: Any = True
    parse: Callable[[str], Any] | None = None

    @property
    def dest(self) -> str:
        """The argparse destination, ``no_greedy``."""
        return self.flag.lstrip("-").replace("-", "_")


CALIBRATION_PASSES = MethodOption(
    "--calibration-passes",
    "calibration_passes",
    "passes over the calibration text (default 2: dense, then refined in the sparse one)",
    parse=positive_int,
)
ATTENTION = MethodOption(
    "--attention", "attention", "also sparsify the inputs of the attention projections"
)
NO_GREEDY = MethodOption(
    "--no-greedy",
    "greedy",
    "the same sparsity for every linear layer instead of TEAL's greedy allocation inside each "
    "block",
    value=False,
)
RANK = MethodOption(
    "--rank",
    "rank",
    "singular directions of each weight that carry the dropped inputs (a count, at most "
    "min(in, out) of every layer)",
    parse=positive_int,
)


def choice_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A :attr:`MethodOption.parse` that takes one of ``choices`` (a ValueError naming them
    otherwise).

    Example:
        >>> choice_of(("a", "b"))("b")
        'b'
    """

    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


centre_choice = choice_of(CENTRES)  # parses --centre
budget_choice = choice_of(BUDGET_RULES)  # parses --budget


CENTRE = MethodOption(
    "--centre",
    "centre",
    "subtract each input channel's calibrated mode, median or mean before sparsifying and add "
    "W @ centre back as a bias (SCAP); none: plain magnitudes",
    parse=centre_choice,
)


BUDGET = MethodOption(
    "--budget",
    "budget",
    "how the target is spread: block (each block at the target), global (one budget over "
    "all blocks, by measured error) or tail (by each weight's heavy-tail exponent, no search)",
    parse=budget_choice,
)
CALIBRATED_OPTIONS = (CALIBRATION_PASSES,)
LAYERWISE_OPTIONS = (ATTENTION, NO_GREEDY, BUDGET)


def register_sparsify_method(
    *,
    name: str,
    config_cls: type[SparsifyConfig],
    handler: MethodHandler,
    help: str = "",  # noqa: A002 - argparse's word for it
    cli_options: tuple[MethodOption, ...] = (),
    sweep_levels: tuple[float, ...] = DEFAULT_SWEEP_LEVELS,
    overwrite: bool = False,
) -> MethodHandler:
    """Register a training-free method: ``sparsify_`` dispatches ``config_cls`` to ``handler``,
    ``config_from_dict`` rebuilds it by ``name``, ``moefy sparsify --method name`` runs it with
    the ``cli_options`` it declares, and ``moefy sweep`` evaluates it at each keep (share of
    the FFN kept).

    Args:
        name: the method's name; must equal ``config_cls.method``.
        config_cls: a frozen dataclass derived from :class:`SparsifyConfig`.
        handler: installs and calibrates the method's wrappers.
        help: one line for ``--help`` (default: the first line of the config's docstring).
        cli_options: config fields ``moefy sparsify`` exposes for this method; an option that
            several methods declare is added once.
        sweep_levels: the sweep's default levels (keep: share of the FFN kept, in (0, 1]).
        overwrite: replace a method of the same name.

    Returns:
        ``handler``.

    Raises:
        MoefyError: a taken name (without ``overwrite``), a name that differs from the config's
            ``method``, an option for a field the config lacks or whose flag another method
            defines differently, levels outside (0, 1].

    Example:
        >>> register_sparsify_method(name="teal", config_cls=TEALConfig, handler=TEALHandler(),
        ...                          help="TEAL: |x| thresholds", cli_options=LAYERWISE_OPTIONS)
    """
    _check_registration(name, config_cls, handler, cli_options, sweep_levels)
    if not overwrite and name in SPARSIFY_METHODS:
        raise MoefyError(f"sparsify method {name!r} exists already; pass overwrite=True")
    SPARSIFY_METHODS.register(
        name,
        handler,
        help=help or _first_line(config_cls.__doc__) or name,
        overwrite=overwrite,
        config_cls=config_cls,
        cli_options=tuple(cli_options),
        sweep_levels=tuple(float(level) for level in sweep_levels),
    )
    return handler


def unregister_sparsify_method(name: str) -> None:
    """Remove a registered method (tests remove the toy methods they register)."""
    SPARSIFY_METHODS.unregister(name)


def _check_registration(
    name: str,
    config_cls: type[SparsifyConfig],
    handler: MethodHandler,
    cli_options: tuple[MethodOption, ...],
    sweep_levels: tuple[float, ...],
) -> None:
    if not (isinstance(config_cls, type) and issubclass(config_cls, SparsifyConfig)):
        raise MoefyError(
            f"{name}: config_cls must be a SparsifyConfig subclass, got {config_cls!r}"
        )
    if config_cls.method != name:
        raise MoefyError(
            f"{name}: {config_cls.__name__}.method is {config_cls.method!r}; give the config "
            f"class method = {name!r}"
        )
    if not isinstance(handler, MethodHandler):
        raise MoefyError(f"{name}: handler must be a MethodHandler, got {handler!r}")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for option in cli_options:
        if not isinstance(option, MethodOption) or option.field not in fields:
            raise MoefyError(f"{name}: option {option!r} sets no field of {config_cls.__name__}")
        other = next((o for o in method_options() if o.flag == option.flag), option)
        if other != option:
            raise MoefyError(f"{name}: {option.flag} is defined differently by another method")
    levels_ok = bool(sweep_levels) and all(
        is_number(level) and 0.0 < level <= 1.0 for level in sweep_levels
    )
    if not levels_ok:
        raise MoefyError(f"{name}: sweep_levels must be kept shares in (0, 1], got {sweep_levels}")


def _first_line(text: str | None) -> str:
    return (text or "").strip().split("\n", 1)[0].strip()


def method_options() -> list[MethodOption]:
    """Every option the registered methods declare, once each, in registration order."""
    options: dict[str, MethodOption] = {}
    for entry in SPARSIFY_METHODS.entries():
        for option in entry.meta["cli_options"]:
            options.setdefault(option.flag, option)
    return list(options.values())


def methods_taking(option: MethodOption) -> list[str]:
    """The registered methods that declare ``option``."""
    return [e.name for e in SPARSIFY_METHODS.entries() if option in e.meta["cli_options"]]


def method_entry(name: str) -> Entry[MethodHandler]:
    """The registry entry of ``name`` (``value``: the handler; ``meta``: config_cls,
    cli_options, sweep_levels); a one-line error with a close match for an unknown name."""
    return SPARSIFY_METHODS.get(name)


def handler_for(config: SparsifyConfig) -> MethodHandler:
    """The handler registered for ``type(config)``.

    Example:
        >>> handler_for(TEALConfig()).install(model, TEALConfig())
    """
    entry = SPARSIFY_METHODS.find(lambda e: e.meta["config_cls"] is type(config))
    if entry is None:
        known = ", ".join(e.meta["config_cls"].__name__ for e in SPARSIFY_METHODS.entries())
        raise MoefyError(f"no sparsify method for {type(config).__name__}: use one of {known}")
    return entry.value


def register_method(config_type: type[SparsifyConfig], handler: MethodHandler) -> None:
    """Make ``sparsify_`` dispatch configs of ``config_type`` to ``handler``, under the name
    ``config_type.method`` (replacing a method of that name); :func:`register_sparsify_method`
    also takes the help, options and sweep levels.

    Example:
        >>> register_method(MyConfig, MyHandler())
    """
    register_sparsify_method(
        name=config_type.method, config_cls=config_type, handler=handler, overwrite=True
    )


class _Handlers(Mapping):
    """Config type -> handler, read live from the registry."""

    def _by_type(self) -> dict[type[SparsifyConfig], MethodHandler]:
        return {e.meta["config_cls"]: e.value for e in SPARSIFY_METHODS.entries()}

    def __getitem__(self, config_type: type[SparsifyConfig]) -> MethodHandler:
        return self._by_type()[config_type]

    def __iter__(self) -> Iterator[type[SparsifyConfig]]:
        return iter(self._by_type())

    def __len__(self) -> int:
        return len(SPARSIFY_METHODS)


HANDLERS: Mapping[type[SparsifyConfig], MethodHandler] = _Handlers()
