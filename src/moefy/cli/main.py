"""The ``moefy`` command line: thin subcommands that build a config and call a verb.

Heavy imports (torch, transformers) happen inside each command's ``run``, so ``moefy --help`` is
instant. A user mistake (:class:`moefy.errors.MoefyError`, a bad argument) prints one line and
exits with code 2; nothing is left half-written because every verb writes atomically. Ctrl-C
exits with 130 and SIGTERM with 143, after the same clean-up.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

# subcommand -> module defining ``HELP``, ``add_arguments(parser)`` and ``run(args)``
COMMANDS = {
    "profile": "moefy.cli.profile_cmd",
    "convert": "moefy.cli.convert_cmd",
    "splits": "moefy.cli.splits_cmd",
    "train-routers": "moefy.cli.routers_cmd",
    "sparsify": "moefy.cli.sparsify_cmd",
    "generate": "moefy.cli.generate_cmd",
    "bench": "moefy.cli.bench_cmd",
    "evaluate": "moefy.cli.evaluate_cmd",
    "sweep": "moefy.cli.sweep_cmd",
    "report": "moefy.cli.report_cmd",
    "layers": "moefy.cli.layers_cmd",
    "drop": "moefy.cli.drop_cmd",
    "finetune": "moefy.cli.finetune_cmd",
    "export": "moefy.cli.export_cmd",
}

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives, so that every ``finally`` and context
    manager on the stack runs (temporary outputs removed, locks released) as on Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM (schedulers, ``timeout``, ``docker stop``) into :class:`Terminated` while
    a command runs; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line that points at ``--help``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    from moefy import __version__

    parser = _OneLineParser(
        prog="moefy",
        description="Profile, MoEfy, route and sparsify the FFNs of Hugging Face models.",
    )
    parser.add_argument("--version", action="version", version=f"moefy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run, _parser=cmd)
    return parser


def _quiet_libraries() -> None:
    """Hide transformers' per-file loading bars and info logs: moefy shows its own progress."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> None:
    """Exit with one line naming the unknown arguments and the closest option, if any."""
    import difflib

    message = f"unrecognized arguments: {' '.join(extras)}"
    names = [o[2:] for action in parser._actions for o in action.option_strings if o[:2] == "--"]
    unknown = next((e[2:].split("=", 1)[0] for e in extras if e.startswith("--")), None)
    close = difflib.get_close_matches(unknown, names, n=1, cutoff=0.8) if unknown else []
    if close:
        message += f"; did you mean --{close[0]}?"
    parser.error(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moefy`` console script; returns the exit code."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # blame the subcommand, whose --help lists what it takes
        _unrecognized(getattr(args, "_parser", parser), extras)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return EXIT_USAGE
    from moefy.errors import MoefyError

    _quiet_libraries()
    try:
        with _sigterm_unwinds():
            return int(args._run(args) or 0)
    except MoefyError as err:
        sys.stderr.write(f"moefy {args.command}: error: {err}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("moefy: interrupted (nothing half-written was kept)\n")
        return EXIT_INTERRUPTED
    except Terminated:
        sys.stderr.write("moefy: terminated (nothing half-written was kept)\n")
        return EXIT_TERMINATED


if __name__ == "__main__":
    sys.exit(main())
