"""Build the C++ kernels once and cache them; every later process loads the cached library.

The library lives in ``cache_dir()/kernels/<name>/<name>.so`` (``MOEFY_CACHE`` or the user cache
folder), where ``<name>`` carries a hash of the C++ source, the compiler flags and the torch
version: a changed source or a new torch gets a fresh build, anything else loads the file that is
there without calling the compiler. ``torch.utils.cpp_extension`` does the compiling (it needs a
C++ compiler and ninja; ninja comes from PyPI, see requirements/pinned.txt) and holds a file lock,
so two processes building at once do not collide.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from importlib.resources import files
from pathlib import Path
from types import ModuleType

import torch

SOURCE_FILE = "sparse_ffn.cpp"
NAME_PREFIX = "moefy_cpu"
HASH_CHARS = 16
# AVX2 + FMA code; -fopenmp so at::parallel_for runs on torch's (already loaded) OpenMP runtime.
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++17")
LDFLAGS = ("-fopenmp",)
# Set to 1 to act as if no compiler were present (the fallback path; tests use it too).
NO_BUILD_ENV = "MOEFY_KERNELS_NO_BUILD"
CPU_CAPABILITIES = ("AVX2", "AVX512")


class KernelBuildError(RuntimeError):
    """The C++ kernels cannot be built or loaded here; the message is one line that says why."""


def source_path() -> Path:
    """Path of the C++ source shipped inside the package."""
    return Path(str(files("moefy.kernels") / "csrc" / SOURCE_FILE))


def library_name() -> str:
    """``moefy_cpu_<hash>``: the hash covers the source, the flags and the torch version."""
    digest = hashlib.sha256(source_path().read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    digest.update(torch.__version__.encode())
    return f"{NAME_PREFIX}_{digest.hexdigest()[:HASH_CHARS]}"


def build_directory() -> Path:
    """Folder of this source's cached build."""
    from moefy.models.load import cache_dir

    return cache_dir() / "kernels" / library_name()


def load_extension() -> ModuleType:
    """The compiled kernel module: loaded from the cache, or built there first.

    Returns:
        A module with ``expert_ffn`` and ``threshold_linear``.

    Raises:
        KernelBuildError: a CPU without AVX2, ``MOEFY_KERNELS_NO_BUILD=1``, no compiler or
            ninja, or a failed compile.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in CPU_CAPABILITIES:
        raise KernelBuildError(f"this CPU has no AVX2 (torch reports {capability})")
    if os.environ.get(NO_BUILD_ENV, "") not in ("", "0"):
        raise KernelBuildError(f"building is switched off ({NO_BUILD_ENV} is set)")
    name, folder = library_name(), build_directory()
    if name in sys.modules:
        return sys.modules[name]
    library = folder / f"{name}.so"
    module = _import_library(name, library) if library.is_file() else _compile(name, folder)
    sys.modules[name] = module
    return module


def _compile(name: str, folder: Path) -> ModuleType:
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise KernelBuildError("no C++ compiler found (install g++ or clang, or set CXX)")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(source_path())],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(folder),
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KernelBuildError(f"compiling {SOURCE_FILE} failed: {first_line}") from err


def _put_ninja_on_path() -> None:
    """cpp_extension calls ``ninja`` by name: add the venv's (PyPI ninja) when PATH lacks one."""
    if shutil.which("ninja") is not None:
        return
    candidates = [Path(sys.executable).parent]
    if importlib.util.find_spec("ninja") is not None:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    for folder in candidates:
        if (folder / "ninja").is_file():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return
    raise KernelBuildError("ninja not found: pip install ninja (see requirements/pinned.txt)")


def _import_library(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise KernelBuildError(f"cannot load {library}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        raise KernelBuildError(
            f"loading {library.name} failed: {err}; delete it to rebuild"
        ) from err
    return module
