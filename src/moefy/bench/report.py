"""The benchmark's report: lines and tables built from the JSON-ready results; ``moefy bench``
prints them (the library returns, the CLI prints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Table:
    """A titled table: rows are dicts with the same keys, which become the column headers."""

    title: str
    rows: list[dict[str, object]]


# a report is its lines and tables in print order
Report = list[str | Table]


def cpu_report(results: dict[str, Any]) -> Report:
    """The bandwidth line, the FFN, expert-size and decode tables of :func:`run_bench`.

    Args:
        results: what :func:`moefy.bench.run_bench` (or :func:`moefy.bench.run_gpu_bench`,
            which has the same layout) returned.

    Returns:
        Lines and :class:`Table` s in print order.

    Example:
        >>> [item.title[:4] for item in cpu_report(results) if isinstance(item, Table)]
        ['FFN:', 'deco']
    """
    load_before = results["machine_before"].get("load_average")
    load_after = results.get("machine_after", {}).get("load_average")
    bandwidth = ", ".join(
        f"{threads} thread(s) {gbps:.1f} GB/s"
        for threads, gbps in results["bandwidth_gbps"].items()
    )
    report: Report = [
        f"kernels: {results['kernels']}; read bandwidth: {bandwidth}; "
        f"load average before {_load(load_before)}, after {_load(load_after)}"
    ]
    if results["ffn"]:
        report.append(
            Table(
                "FFN: sparse kernel vs torch dense (speedup = dense / sparse median; limit = the "
                "speed-up its bytes allow at the measured bandwidth)",
                [_ffn_row(row) for row in results["ffn"]],
            )
        )
    if results.get("expert_size"):
        report.append(
            Table(
                "expert size: the expert kernel at S neurons per expert, the same share of "
                "experts per token (random), tokens/s against torch dense in the same rounds; "
                "grouped = the MoE layer's torch path at batches the kernel does not take",
                [_expert_size_row(row) for row in results["expert_size"]],
            )
        )
    if results.get("balance"):
        report.append(balance_table(results["balance"]))
    if results["decode"]:
        step = results["decode"][0].get("step", "generate")
        how = "a compiled static-cache step" if step == "compiled" else "generate"
        report.append(
            Table(
                f"decode: tokens/s through {how} (routers untrained: speed depends on how many "
                "experts run, not on which)",
                [decode_table_row(row) for row in results["decode"]],
            )
        )
    return report


def _load(values: list[float] | None) -> str:
    return "n/a" if not values else "/".join(f"{v:.1f}" for v in values)


def _ffn_row(row: dict[str, Any]) -> dict[str, object]:
    return {
        "thr": row["threads"],
        "shape": row["shape"],
        "batch": row["batch"],
        "method": row["method"],
        "active": f"{row['active']:.2%}",
        "dense ms": row["dense_ms"],
        "sparse ms": row["sparse_ms"],
        "speedup": f"{row['speedup']:.2f}x",
        "limit": f"{row['limit_speedup']:.2f}x",
        "of bandwidth": f"{row['of_bandwidth']:.0%}",
    }


def _expert_size_row(row: dict[str, Any]) -> dict[str, object]:
    return {
        "thr": row["threads"],
        "batch": row["batch"],
        "S": row["expert_size"],
        "experts": row["experts"],
        "keep": f"{row['keep']:.0%}",
        "path": row["path"],
        "tok/s": row["tokens_per_s"],
        "dense tok/s": row["dense_tokens_per_s"],
        "vs dense": f"{row['vs_dense']:.2f}x",
        "read": f"{row['union']:.0%}",
    }


def balance_table(rows: list[dict[str, Any]]) -> Table:
    """The table of :func:`moefy.bench.balance.run_balance_bench`'s rows."""
    first = rows[0]
    return Table(
        f"balance: share of a layer's {first['experts']} experts that a decode batch of B "
        f"tokens reads (oracle top-k, {first['keep']:.0%} per token), without and with the "
        "auxiliary-loss-free load bias; imbalance = busiest expert's load / mean load",
        [
            {
                "variant": row["variant"],
                "B": row["batch"],
                "read": f"{row['read']:.1%}",
                "imbalance": f"{row['imbalance']:.2f}",
            }
            for row in rows
        ],
    )


def decode_table_row(row: dict[str, Any], *, threads: bool = True) -> dict[str, object]:
    """One printed row of a decode table (see :func:`moefy.bench.decode.speed_rows`)."""
    shown: dict[str, object] = {"thr": row["threads"]} if threads else {}
    shown.update(
        {
            "variant": row["variant"],
            "active": f"{row['active']:.1%}",
            "tok/s": row["tokens_per_s"],
            "ms/token": row["ms_per_token"],
            "MB/token": row["mb_per_token"],
            "speedup": f"{row['speedup']:.2f}x",
            "limit": f"{row['limit_speedup']:.2f}x",
        }
    )
    return shown
