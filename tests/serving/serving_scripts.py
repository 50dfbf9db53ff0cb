"""Paths of the serving scripts and of the engines' venvs, shared by the serving tests.

``serving/`` holds scripts that run in several venvs, not a package: the tests load its
module ``compare.py`` from its file and run ``check.py`` as a process.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVING = REPO / "serving"
CHECK_SCRIPT = SERVING / "check.py"
# The stamp setup_venvs.sh writes once an engine's install finished.
INSTALLED_STAMP = ".serving-installed"
ENGINE_VENVS = {"vllm": REPO / ".venv-vllm", "llamacpp": REPO / ".venv-llamacpp"}
# llama.cpp's HF -> GGUF converter, which setup_venvs.sh installs after the binding
LLAMACPP_CONVERTER = ENGINE_VENVS["llamacpp"] / "llama.cpp-convert" / "convert_hf_to_gguf.py"


def _load(stem: str):
    name = f"moefy_serving_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SERVING / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_compare():
    """The module ``serving/compare.py``, loaded from its file (cached in ``sys.modules``)."""
    return _load("compare")


def engine_python(engine: str) -> Path | None:
    """The python of an engine's venv when its install finished, else None."""
    venv = ENGINE_VENVS[engine]
    if not (venv / INSTALLED_STAMP).exists():
        return None
    if engine == "llamacpp" and not LLAMACPP_CONVERTER.exists():
        return None
    return venv / "bin" / "python"
