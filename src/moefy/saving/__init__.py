"""One saved format for every model moefy changed: ``moefy.save(model, path)`` writes it,
``moefy.load(path)`` (:func:`moefy.models.load.load_model`) reads it back.

Example:
    >>> from moefy.saving import save
    >>> save(model, "runs/relu-moe", tokenizer=tokenizer)
    >>> model, tokenizer = moefy.load("runs/relu-moe")
"""

from moefy.saving.changes import SAVED_FORMATS, ChangeFormat, Header, register_format
from moefy.saving.folder import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    is_saved_folder,
    load_folder,
    save,
    saved_changes,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "SAVED_FORMATS",
    "ChangeFormat",
    "Header",
    "is_saved_folder",
    "load_folder",
    "register_format",
    "save",
    "saved_changes",
]
