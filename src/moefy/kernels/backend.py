"""Which implementation the kernels run: the backend switch.

``auto`` takes the C++ kernels for CPU tensors when they build here and torch otherwise (saying
so once, in one warning line), and the Triton kernels for CUDA tensors when triton is installed
(torch otherwise); ``reference`` always takes plain torch; ``cpu`` insists on the C++ kernels and
fails with a clear message when they cannot be built; ``triton`` needs the triton package and
CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
The default comes from ``MOEFY_KERNELS`` (else ``auto``); change it with :func:`set_backend` or,
for a block of code, :func:`use_backend`.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

from moefy.errors import MoefyError
from moefy.kernels.build import KernelBuildError, load_extension

BACKEND_ENV = "MOEFY_KERNELS"
INTERPRET_ENV = "TRITON_INTERPRET"  # triton's own switch: "1" runs kernels on CPU tensors


class Backend(str, enum.Enum):
    """Kernel implementations; ``AUTO`` picks the fastest one that works here."""

    AUTO = "auto"
    REFERENCE = "reference"
    CPU = "cpu"
    TRITON = "triton"


class KernelFallbackWarning(RuntimeWarning):
    """``auto`` could not use the C++ kernels and runs torch instead."""


_state: dict[str, object] = {"backend": None, "extension": None, "error": None, "warned": False}


def parse_backend(value: str | Backend) -> Backend:
    """``value`` as a :class:`Backend`.

    Raises:
        MoefyError: not one of auto, reference, cpu, triton.
    """
    try:
        return Backend(value)
    except ValueError:
        known = ", ".join(b.value for b in Backend)
        raise MoefyError(f"unknown kernel backend {value!r}: use one of {known}") from None


def get_backend() -> Backend:
    """The backend in force: the last :func:`set_backend`, else ``$MOEFY_KERNELS``, else auto."""
    chosen = _state["backend"]
    if chosen is None:
        return _from_environment(os.environ.get(BACKEND_ENV) or Backend.AUTO.value)
    return chosen  # type: ignore[return-value]


_parsed: dict[str, Backend] = {}  # environment value -> backend (a plain dict: compile traces it)


def _from_environment(value: str) -> Backend:
    chosen = _parsed.get(value)  # asked on every decode step: parse each value once
    if chosen is None:
        chosen = _parsed[value] = parse_backend(value)
    return chosen


def set_backend(backend: str | Backend | None) -> None:
    """Choose the backend for this process (None: back to ``$MOEFY_KERNELS`` or auto).

    Raises:
        MoefyError: an unknown name, or a backend that cannot run here (cpu without a working
            build, triton without a GPU).
    """
    if backend is None:
        _state["backend"] = None
        return
    chosen = parse_backend(backend)
    check_available(chosen)
    _state["backend"] = chosen


@contextlib.contextmanager
def use_backend(backend: str | Backend) -> Iterator[Backend]:
    """Run a block with another backend, restoring the previous choice afterwards.

    Example:
        >>> with use_backend("reference"):
        ...     y = moe(x)
    """
    previous = _state["backend"]
    set_backend(backend)
    try:
        yield get_backend()
    finally:
        _state["backend"] = previous


def check_available(backend: Backend) -> None:
    """Raise :class:`MoefyError` when an explicitly chosen backend cannot run here."""
    if backend is Backend.CPU and cpu_extension() is None:
        raise MoefyError(
            f"the cpu kernels cannot run here ({_state['error']}); install a C++ compiler and "
            "ninja, or choose the reference backend"
        )
    if backend is Backend.TRITON and not (triton_available() or triton_interpreting()):
        raise MoefyError(
            "the triton backend needs a CUDA GPU and the triton package (pip install "
            f"'moefy[triton]'; {INTERPRET_ENV}=1 interprets it on CPU tensors); choose cpu or "
            "reference on this machine"
        )


def triton_installed() -> bool:
    """Whether the triton package can be imported (it is not imported here; asked once)."""
    if _state.get("triton") is None:  # a plain memo, not functools.cache: compile traces this
        _state["triton"] = importlib.util.find_spec("triton") is not None
    return bool(_state["triton"])


def triton_available() -> bool:
    """Whether a CUDA GPU and the triton package are present."""
    return torch.cuda.is_available() and triton_installed()


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set and triton is installed: kernels on CPU tensors."""
    return os.environ.get(INTERPRET_ENV) == "1" and triton_installed()


def cpu_extension() -> ModuleType | None:
    """The C++ kernel module, built or loaded once per process; None when it cannot be.

    Loading it makes its kernels the CPU implementations of the ``torch.ops.moefy`` operators,
    except under Triton's interpreter, where the operators' Python default serves CPU tensors
    (the C++ or the Triton kernels, by the backend in force; see :mod:`moefy.kernels.library`).
    """
    if _state["extension"] is None and _state["error"] is None:
        try:
            extension = load_extension()
        except KernelBuildError as err:
            _state["error"] = str(err)
        else:
            if not triton_interpreting():
                extension.register_operators()
            _state["extension"] = extension
    return _state["extension"]  # type: ignore[return-value]


def resolve(device: torch.device, backend: str | Backend | None = None) -> Backend:
    """The concrete backend (reference, cpu or triton) that runs a kernel on ``device`` now.

    ``auto`` takes triton for CUDA tensors when it is installed and torch otherwise; on CPU
    tensors, without a working build, it warns once (one line) and answers reference.

    Args:
        device: where the call's tensors are.
        backend: the backend asked for this one call (checked as :func:`set_backend` checks
            it); None: the one in force.

    Raises:
        MoefyError: an unknown name, or a backend that cannot run here or on ``device``.
    """
    if backend is None:
        backend = get_backend()
    else:
        backend = parse_backend(backend)
        check_available(backend)
    if backend is Backend.CPU and device.type != "cpu":
        raise MoefyError(f"the cpu backend runs CPU tensors, not {device.type}; choose auto")
    if backend is Backend.TRITON:
        check_available(backend)
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return Backend.TRITON
        raise MoefyError(
            f"the triton backend runs CUDA tensors, not {device.type} ones ({INTERPRET_ENV}=1 "
            "interprets it on CPU tensors); move the model to cuda or choose auto"
        )
    if backend is Backend.AUTO and device.type == "cuda" and triton_available():
        return Backend.TRITON
    if backend is Backend.REFERENCE or device.type != "cpu":
        return Backend.REFERENCE
    if cpu_extension() is not None:
        return Backend.CPU
    if backend is Backend.CPU:
        check_available(backend)
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            f"moefy: C++ kernels unavailable ({_state['error']}); running torch instead "
            f"(set {BACKEND_ENV}=reference to silence)",
            KernelFallbackWarning,
            stacklevel=3,
        )
    return Backend.REFERENCE


def interpreting_triton() -> bool:
    """Whether CPU tensors run the Triton kernels now: triton is the backend in force and its
    interpreter is on (tests on machines without a GPU)."""
    return get_backend() is Backend.TRITON and triton_interpreting()


def reset_state() -> None:
    """Forget the chosen backend, the loaded extension, its error and the warning (for tests)."""
    _state.update(backend=None, extension=None, error=None, warned=False)
