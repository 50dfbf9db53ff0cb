"""The top-level package: every advertised name resolves, and the verb ``profile`` is a function."""

from __future__ import annotations

import moefy


def test_every_public_name_resolves():
    for name in moefy.__all__:
        assert getattr(moefy, name) is not None, name


def test_profile_is_the_verb_even_after_the_subpackage_is_imported():
    import moefy.profiling  # noqa: F401  (binds a submodule attribute on the package)

    assert callable(moefy.profile)
    assert moefy.profile.__module__.startswith("moefy.profiling")
