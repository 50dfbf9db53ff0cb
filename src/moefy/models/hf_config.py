"""Reading a model folder's Hugging Face ``config.json`` with one-line errors.

transformers explains a config it cannot read in paragraphs (an unknown ``model_type`` comes with
upgrade instructions over several lines); moefy's CLI prints one line that says what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moefy.errors import MoefyError, first_line
from moefy.jsonconfig import loads_json

HF_CONFIG_FILE = "config.json"


def read_hf_config(folder: str | os.PathLike) -> Any:
    """The ``transformers.PretrainedConfig`` of ``folder``, read offline.

    Raises:
        MoefyError: one line: no ``config.json``, not valid JSON, or an architecture
            (``model_type``) that the installed transformers does not know.
    """
    import transformers

    folder = Path(folder)
    try:
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError, RecursionError) as err:  # deep nesting: RecursionError
        raise config_error(folder, err) from None


def config_error(folder: Path, err: BaseException) -> MoefyError:
    """A one-line :class:`MoefyError` for a config that transformers could not read."""
    import transformers

    path = folder / HF_CONFIG_FILE
    if not path.is_file():
        return MoefyError(
            f"{folder} has no {HF_CONFIG_FILE}: give a folder written by save_pretrained"
        )
    model_type = _model_type(path)
    if model_type is None:
        return MoefyError(f"{path} is not a valid model config: {first_line(err)}")
    if not model_type:
        return MoefyError(f"{path} names no model_type: give a folder written by save_pretrained")
    if model_type not in transformers.CONFIG_MAPPING:
        return MoefyError(
            f"unknown architecture {model_type!r} in {path}: transformers "
            f"{transformers.__version__} does not know it; upgrade transformers or give a model "
            "of a supported architecture (see 'Supported architectures' in the README)"
        )
    return MoefyError(f"cannot read the model config in {path}: {first_line(err)}")


def _model_type(path: Path) -> str | None:
    """The ``model_type`` string of a config file; None if it is not a JSON object."""
    try:
        data = loads_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    return str(data.get("model_type", ""))
