"""moefy's GPU speed goals against measured results: met, short, or not measured.

The goals (batch 1, bf16, H100-class GPU; TEAL's own kernel measured 1.68x at 50 % there):

- threshold linear 4096 -> 14336 and 14336 -> 4096: at least 1.9x cuBLAS at 50 % sparsity and
  within 10 % of the bandwidth limit there, 5x at 90 %, no slower than cuBLAS at 0 %;
- the Llama-3-8B MLP block with TEAL thresholds at 50 %: 2.0x; as expert blocks at 25 % of
  experts: 3.2x;
- decode of the Llama-3-8B-shaped model at 50 % model-wide TEAL sparsity: 1.8x dense tokens/s.

``python -m moefy.bench.gpu_goals FOLDER`` reads ``kernels.json`` (``moefy bench --device cuda
--only ffn``) and ``decode-8b.json`` (``--only decode --shape llama3-8b``) from FOLDER, as
benchmarks/gpu_session.sh writes them, and prints one line per goal.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UP = "llama3-8b up 4096->14336"
DOWN = "llama3-8b down 14336->4096"
MLP = "llama3-8b mlp 4096x14336"


@dataclass(frozen=True)
class Goal:
    """One speed goal: a row of a result table (found by its keys) and the least it must reach.

    ``of_limit`` goals compare ``speedup / limit_speedup`` instead of the speedup.
    """

    name: str
    table: str  # "kernels" or "decode"
    keys: tuple[tuple[str, Any], ...]
    at_least: float
    of_limit: bool = False

    def find(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        for row in rows:
            if all(_same(row.get(key), value) for key, value in self.keys):
                return row
        return None


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, float):
        return isinstance(got, int | float) and abs(got - want) < 1e-9
    return got == want


def _kernel(shape: str, method: str, active: float) -> tuple[tuple[str, Any], ...]:
    return (("shape", shape), ("batch", 1), ("method", method), ("active", active))


GOALS = (
    *(
        goal
        for shape in (UP, DOWN)
        for goal in (
            Goal(f"{shape}, 50 %", "kernels", _kernel(shape, "teal", 0.5), 1.9),
            Goal(f"{shape}, 50 %, of limit", "kernels", _kernel(shape, "teal", 0.5), 0.9, True),
            Goal(f"{shape}, 90 %", "kernels", _kernel(shape, "teal", 0.1), 5.0),
            Goal(f"{shape}, 0 %", "kernels", _kernel(shape, "teal", 1.0), 1.0),
        )
    ),
    Goal("Llama-3-8B MLP block, TEAL 50 %", "kernels", _kernel(MLP, "teal", 0.5), 2.0),
    Goal("Llama-3-8B MLP block, 25 % of experts", "kernels", _kernel(MLP, "experts", 0.25), 3.2),
    Goal(
        "Llama-3-8B-shaped decode, TEAL 50 %",
        "decode",
        (("variant", "teal"), ("active", 0.5)),
        1.8,
    ),
)


def check_goals(
    kernels: dict[str, Any] | None, decode: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """One row per goal: ``goal``, ``at_least``, ``measured`` (None if absent) and ``status``.

    Args:
        kernels: ``moefy bench --device cuda --only ffn`` results (``ffn`` rows), or None.
        decode: ``moefy bench --device cuda --only decode --shape llama3-8b`` results, or None.

    Example:
        >>> rows = check_goals(None, None)
        >>> {row["status"] for row in rows}
        {'not measured'}
    """
    tables = {
        "kernels": (kernels or {}).get("ffn", []),
        "decode": (decode or {}).get("decode", []),
    }
    out = []
    for goal in GOALS:
        row = goal.find(tables[goal.table])
        if row is None:
            measured, status = None, "not measured"
        else:
            measured = row["speedup"] / row["limit_speedup"] if goal.of_limit else row["speedup"]
            status = "met" if measured >= goal.at_least else "short"
        out.append(
            {"goal": goal.name, "at_least": goal.at_least, "measured": measured, "status": status}
        )
    return out


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    """Print the goal table for the results in a folder (see the module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m moefy.bench.gpu_goals FOLDER", file=sys.stderr)
        return 2
    folder = Path(args[0])
    kernels, decode = _load(folder / "kernels.json"), _load(folder / "decode-8b.json")
    for row in check_goals(kernels, decode):
        measured = "" if row["measured"] is None else f"{row['measured']:.2f}"
        unit = "of the limit" if row["goal"].endswith("of limit") else "x"
        print(
            f"{row['status']:>12}  {row['goal']}: {measured or '-'} "
            f"(goal >= {row['at_least']:g} {unit})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
