"""Where models run and in which dtype: one resolver for the CLI, the configs and ``load_model``.

Every command that loads or runs a model takes ``--device auto|cpu|cuda`` and
``--dtype auto|fp32|bf16|fp16``; Python callers pass the same strings (or torch objects) to
:func:`moefy.load_model`. ``auto`` picks CUDA when torch sees a GPU, else the CPU; the ``auto``
dtype is bf16 on CUDA and fp32 on the CPU. The defaults of the commands stay ``cpu`` (so fp32),
the behaviour moefy had before it knew about devices.

Statistics (profiles, co-activation counts, router targets, histograms) are accumulated in fp32
or wider whatever the model dtype: the dtype chosen here is the dtype of the weights only.
"""

from __future__ import annotations

import os

import torch

from moefy.errors import MoefyError

AUTO = "auto"
DEVICE_NAMES = (AUTO, "cpu", "cuda")
# short name -> dtype; the long torch names are accepted too (recipes, saved configs)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DTYPE_NAMES = (AUTO, *DTYPES)
# the dtype ``auto`` gives on each device type
AUTO_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
LOCAL_RANK_ENV = "LOCAL_RANK"  # set by torchrun: the GPU of this process on its node


def cuda_available() -> bool:
    """Whether torch can run on a CUDA GPU here."""
    return torch.cuda.is_available()


def resolve_device(spec: str | torch.device | None = AUTO) -> torch.device:
    """The torch device a device spec names.

    Args:
        spec: ``"auto"`` (CUDA when present, else CPU; also for None), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``, or a ``torch.device``. Under ``torchrun`` a bare ``cuda`` (or ``auto``
            on a GPU machine) is this process's GPU, ``cuda:$LOCAL_RANK``.

    Returns:
        The device.

    Raises:
        MoefyError: an unknown spec, or CUDA asked for where torch sees no GPU.

    Example:
        >>> resolve_device("auto")  # on a machine without a GPU
        device(type='cpu')
    """
    if spec is None:
        spec = AUTO
    if isinstance(spec, torch.device):
        device = spec
    elif not isinstance(spec, str):
        raise MoefyError(f"device must be one of {', '.join(DEVICE_NAMES)}, got {spec!r}")
    elif spec.strip().lower() == AUTO:
        device = torch.device("cuda" if cuda_available() else "cpu")
    else:
        try:
            device = torch.device(spec.strip().lower())
        except RuntimeError:
            device = None
        if device is None or device.type not in DEVICE_NAMES:
            raise MoefyError(f"unknown device {spec!r}: use {', '.join(DEVICE_NAMES)} (or cuda:N)")
    if device.type != "cuda":
        return device
    if not cuda_available():
        raise MoefyError(
            "CUDA was asked for but torch sees no GPU here (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}): "
            "use --device cpu or --device auto"
        )
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get(LOCAL_RANK_ENV, "0")))
    if device.index >= torch.cuda.device_count():
        raise MoefyError(
            f"there is no GPU {device} here: torch sees {torch.cuda.device_count()} GPU(s)"
        )
    return device


def resolve_dtype(
    spec: str | torch.dtype | None = AUTO, device: torch.device | str | None = None
) -> torch.dtype:
    """The floating dtype a dtype spec names, on ``device``.

    Args:
        spec: ``"auto"`` (bf16 on CUDA, fp32 elsewhere; also for None), ``"fp32"``, ``"bf16"``,
            ``"fp16"`` (or ``float32`` / ``bfloat16`` / ``float16``), or a floating torch dtype.
        device: where the model runs (a spec as for :func:`resolve_device`, or a device); only
            ``auto`` reads it. None means the CPU.

    Returns:
        The dtype.

    Raises:
        MoefyError: an unknown spec, or a dtype that is not floating point.

    Example:
        >>> resolve_dtype("auto", torch.device("cpu"))
        torch.float32
    """
    if isinstance(spec, torch.dtype):
        if not spec.is_floating_point:
            raise MoefyError(
                f"dtype must be a floating torch dtype (torch.float32, ...), got {spec!r}"
            )
        return spec
    if spec is None:
        spec = AUTO
    if not isinstance(spec, str):
        raise MoefyError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {spec!r}")
    name = spec.strip().lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name == AUTO:
        where = torch.device("cpu") if device is None else torch.device(device)
        return AUTO_DTYPE.get(where.type, torch.float32)
    if name not in DTYPES:
        raise MoefyError(f"unknown dtype {spec!r}: use {', '.join(DTYPE_NAMES)}")
    return DTYPES[name]


def resolve(
    device: str | torch.device | None = AUTO, dtype: str | torch.dtype | None = AUTO
) -> tuple[torch.device, torch.dtype]:
    """``(resolve_device(device), resolve_dtype(dtype, that device))`` in one call.

    Example:
        >>> resolve("cpu", "bf16")
        (device(type='cpu'), torch.bfloat16)
    """
    where = resolve_device(device)
    return where, resolve_dtype(dtype, where)


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype (``fp32``, ``bf16``, ``fp16``), else torch's own name."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
