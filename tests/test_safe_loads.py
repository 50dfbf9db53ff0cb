"""No ``torch.load`` in moefy's code or benchmarks may unpickle arbitrary objects: every call
passes ``weights_only=True`` literally. The source is read with ``ast``, so aliases
(``import torch as th``, ``from torch import load``) and calls split over lines are seen too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("src", "benchmarks")
TORCH_LOADERS = ("torch.load", "torch.serialization.load")


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attribute accesses on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> full module or object path, from every import in the file."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def unsafe_torch_loads(source: str, filename: str = "<snippet>") -> list[str]:
    """``file:line`` of every ``torch.load`` call without a literal ``weights_only=True``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        dotted = _dotted(node.func)
        if dotted is None:
            continue
        head, _, rest = dotted.partition(".")
        full = ".".join(filter(None, [aliases.get(head, head), rest]))
        if full not in TORCH_LOADERS:
            continue
        safe = any(
            kw.arg == "weights_only"
            and isinstance(kw.value, ast.Constant)
            and kw.value.value is True
            for kw in node.keywords
        )
        if not safe:
            found.append(f"{filename}:{node.lineno}")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nstate = torch.load(path)\n",
        "import torch\nstate = torch.load(path, map_location='cpu', weights_only=False)\n",
        "import torch\nstate = torch.load(\n    path,\n    weights_only=flag,\n)\n",
        "import torch\nstate = torch.load(path, **options)\n",
        "import torch as th\nstate = th.load(path)\n",
        "from torch import load\nstate = load(path)\n",
        "from torch import load as read\nstate = read(path)\n",
        "import torch.serialization\nstate = torch.serialization.load(path)\n",
        "def f():\n    import torch\n    return torch.load(path)\n",
    ],
)
def test_the_scanner_finds_an_unsafe_load(snippet):
    assert unsafe_torch_loads(snippet) != []


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nstate = torch.load(path, map_location='cpu', weights_only=True)\n",
        "import json\nstate = json.load(file)\n",
        "from safetensors.torch import load_file\nstate = load_file(path)\n",
    ],
)
def test_the_scanner_passes_a_safe_or_unrelated_load(snippet):
    assert unsafe_torch_loads(snippet) == []


def test_no_unsafe_torch_load_in_the_source():
    files = [path for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 50  # the scan really reads the package
    found = [
        hit
        for path in files
        for hit in unsafe_torch_loads(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == [], f"torch.load without weights_only=True: {found}"
