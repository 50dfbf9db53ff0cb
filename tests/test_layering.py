"""The package's layering, read from the source: the library never imports the CLI, no two modules
import each other (at module level or inside functions), and no library function outgrows a screen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 80
# argparse option lists: long by nature, one add_argument call after another
OPTION_BUILDERS = {"add_arguments"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / "moefy").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules of moefy that ``name`` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            found.update(m for m in submodules if m in MODULES)
            if not all(m in MODULES for m in submodules):
                found.add(base)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def test_the_library_never_imports_the_cli():
    offenders = sorted(
        (name, target)
        for name, targets in GRAPH.items()
        if not name.startswith("moefy.cli")
        for target in targets
        if target.startswith("moefy.cli")
    )
    assert offenders == []


def test_no_two_modules_import_each_other():
    # a package's __init__ re-exporting its submodules is not a cycle of design
    pairs = sorted(
        (a, b)
        for a, targets in GRAPH.items()
        for b in targets
        if a < b and a in GRAPH.get(b, ()) and not (_is_package(a) or _is_package(b))
    )
    assert pairs == []


def _long_functions() -> list[tuple[str, str, int]]:
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and node.name not in OPTION_BUILDERS:
                    long.append((name, node.name, lines))
    return long


def test_no_library_function_over_a_screen():
    assert _long_functions() == []


@pytest.mark.parametrize("module", ["moefy.cli.main", "moefy.sparsify", "moefy.moe"])
def test_the_checker_reads_real_imports(module):
    # guards the two tests above against passing because the graph came out empty
    assert GRAPH[module], f"{module} should import other moefy modules"
