"""The sweep report: one self-contained HTML file (plots embedded as base64 PNG, no network).

It holds the Pareto plots of quality against measured FFN FLOPs (one curve per method in the
rows, whichever package registered it), the headline (the best method within 50 % and 25 % of
the dense FFN FLOPs), the profile's per-layer plots when a profile folder is given, and the full
table. The curves are also embedded as JSON
(``<script type="application/json" id="moefy-curves">``) so tools can read them back.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moefy.io import atomic_path
from moefy.jsonconfig import is_number
from moefy.sweep.methods import KEEP, get_method, method_names

HEADLINE_BUDGETS = (0.5, 0.25)
# A method "fits" a budget when its measured FFN FLOPs are within this factor of it: routers
# and rounding add a little to the nominal share.
BUDGET_TOLERANCE = 1.02


QUALITY_PLOTS = (
    ("perplexity_ratio", "perplexity / dense perplexity", True),
    ("kl_to_dense", "KL(dense || model), nats per token", True),
    ("top1_agreement", "top-1 agreement with dense", False),
)


def curves(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, list[list[float]]]:
    """Method -> [[ffn_flops_fraction, metric], ...] by FLOPs; rows lacking either are left out."""
    out: dict[str, list[list[float]]] = {}
    for row in rows:
        x, y = row.get("ffn_flops_fraction"), row.get(metric)
        if x is None or y is None:
            continue
        out.setdefault(row["method"], []).append([float(x), float(y)])
    for points in out.values():
        points.sort()
    return out


def headline(
    rows: Sequence[dict[str, Any]], budgets: Sequence[float] = HEADLINE_BUDGETS
) -> list[dict[str, Any]]:
    """For each FFN FLOPs budget, the deployable row with the lowest perplexity that fits it.

    Dense and the methods registered as not deployable (the oracle: it computes every expert to
    choose some) are left out; they stay in the plots and the table as the bound a router can
    reach. A method no longer registered (rows read back from an older sweep) counts as
    deployable.

    Returns:
        One dict per budget: ``budget`` and ``row`` (None when nothing fits).
    """
    out = []
    for budget in budgets:
        fitting = [
            r
            for r in rows
            if r["method"] != "dense"
            and _deployable(r["method"])
            and r.get("perplexity") is not None
            and r.get("ffn_flops_fraction") is not None
            and r["ffn_flops_fraction"] <= budget * BUDGET_TOLERANCE
        ]
        best = min(fitting, key=lambda r: r["perplexity"], default=None)
        out.append({"budget": budget, "row": best})
    return out


def _deployable(method: str) -> bool:
    """Whether the sweep registers ``method`` as a way to run a model faster."""
    return method not in method_names() or get_method(method).deployable


def _plot_png(rows: Sequence[dict[str, Any]], metric: str, label: str, log_y: bool) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(rows, metric)
    if not data:
        return None
    figure, axes = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    markers = "osD^v<>phX*"
    for i, (method, points) in enumerate(sorted(data.items())):
        xs, ys = zip(*points, strict=True)
        style = (
            {"color": "black", "marker": "*", "markersize": 12}
            if method == "dense"
            else {"marker": markers[i % len(markers)]}
        )
        axes.plot(xs, ys, label=_plain_label(method), linewidth=1.6, **style)
    chance_key = metric.removesuffix("_accuracy") + "_chance"
    chance = [r[chance_key] for r in rows if r.get(chance_key) is not None]
    if chance:  # the majority-label rate of the scored examples
        axes.axhline(max(chance), color="grey", linestyle="--", linewidth=1, label="chance")
    if log_y and all(y > 0 for points in data.values() for _, y in points):
        axes.set_yscale("log")
    axes.set_xlabel("FFN FLOPs per token / dense (measured)")
    axes.set_ylabel(label)
    axes.set_xlim(left=0)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _level_text(level: Any) -> str:
    """A row's level for HTML text: ``0.5``, empty for None, escaped text otherwise."""
    if level is None:
        return ""
    return f"{level:g}" if is_number(level) else html.escape(str(level))


def _level_phrase(row: dict[str, Any]) -> str:
    """A row's level with what it means, for HTML text: ``keep 0.5``, ``level 4 (layers
    removed)``."""
    level = _level_text(row.get("level"))
    meaning = row.get("level_meaning")
    if meaning == KEEP:
        return f"keep {level}"
    return f"level {level} ({html.escape(str(meaning))})" if meaning else f"level {level}"


def _script_json(data: Any) -> str:
    """``data`` as JSON that is safe inside a ``<script>`` element: ``<``, ``>`` and ``&``
    become ``\\u003c``, ``\\u003e`` and ``\\u0026`` (no string can close the element or open
    a comment), U+2028 / U+2029 become escapes too. ``json.loads`` reads the same data back."""
    text = json.dumps(data)
    for char, escaped in _SCRIPT_ESCAPES.items():
        text = text.replace(char, escaped)
    return text


# Inside <script> these could end the element, open a comment or (U+2028/9) end a JavaScript
# line; json.dumps leaves the first three as they are.
_SCRIPT_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def _plain_label(name: str) -> str:
    """A legend label shown as written: ``$`` would start mathtext (a bad formula fails the
    plot) and a leading ``_`` hides the curve from the legend."""
    label = str(name).replace("$", r"\$")
    return " " + label if label.startswith("_") else label


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return ""
    if not is_number(value):  # rows read back from disk may hold anything: show it as text
        return html.escape(str(value))
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "g":
        return f"{value / 1e9:.3f}"
    if kind == "3f":
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


TABLE_COLUMNS = (
    ("method", "method", ""),
    ("level", "level", ""),
    ("level_meaning", "level is", ""),
    ("ffn_flops_fraction", "FFN FLOPs", "pct"),
    ("linear_flops_fraction", "block linear FLOPs", "pct"),
    ("measured_sparsity", "weights skipped (measured)", "pct"),
    ("total_flops_per_token", "GFLOPs / token", "g"),
    ("perplexity", "perplexity", ""),
    ("perplexity_ratio", "ratio to dense", ""),
    ("top1_agreement", "top-1 agreement", "pct"),
    ("kl_to_dense", "KL to dense", "3f"),
    ("bbc-topic_accuracy", "BBC topic acc.", "pct"),
    ("tweet-sentiment_accuracy", "tweet sentiment acc.", "pct"),
    ("seconds", "seconds", ""),
)


def _table(rows: Sequence[dict[str, Any]]) -> str:
    columns = [c for c in TABLE_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{_fmt(row.get(key), kind)}</td>" for key, _, kind in columns)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _headline_html(rows: Sequence[dict[str, Any]]) -> str:
    items = []
    for entry in headline(rows):
        row = entry["row"]
        if row is None:
            items.append(
                f"<li>within {entry['budget']:.0%} of dense FFN FLOPs: no method fits</li>"
            )
            continue
        ratio = row.get("perplexity_ratio")
        items.append(
            f"<li>within {entry['budget']:.0%} of dense FFN FLOPs: <b>{html.escape(row['method'])}"
            f"</b> at {_level_phrase(row)} "
            f"(FFN FLOPs {row['ffn_flops_fraction']:.1%}, "
            f"perplexity {row['perplexity']:.2f}"
            + (f", {ratio:.3f}x dense" if ratio is not None else "")
            + ")</li>"
        )
    return "<ul>" + "".join(items) + "</ul>"


def _profile_images(profile: str | os.PathLike | None) -> list[tuple[str, bytes]]:
    if profile is None:
        return []
    folder = Path(profile)
    return [(p.stem.replace("_", " "), p.read_bytes()) for p in sorted(folder.rglob("*.png"))]


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child { text-align: left; }
.plots img { max-width: 49%; } .meta { color: #666; font-size: 0.85em; }
pre.meta { white-space: pre-wrap; overflow-wrap: anywhere; }
"""


def render_report(
    rows: Sequence[dict[str, Any]],
    *,
    config: Any = None,
    title: str = "moefy sweep",
) -> str:
    """The report as an HTML string (see the module docstring)."""
    from moefy import __version__

    plots = []
    for metric, label, log_y in QUALITY_PLOTS:
        png = _plot_png(rows, metric, label, log_y)
        if png is not None:
            plots.append(_img(png, f"{label} against FFN FLOPs"))
    for key, title_text, _ in TABLE_COLUMNS:
        if key.endswith("_accuracy"):
            png = _plot_png(rows, key, title_text, False)
            if png is not None:
                plots.append(_img(png, f"{title_text} against FFN FLOPs"))
    profile = getattr(config, "profile", None)
    profile_html = "".join(_img(png, name) for name, png in _profile_images(profile))
    curves_json = _script_json({m: curves(rows, m) for m, _, _ in QUALITY_PLOTS})
    settings = "" if config is None else html.escape(json.dumps(config.to_dict(), default=str))
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model = html.escape(str(getattr(config, "model", "")))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}: {model}</h1>
<p class="meta">moefy {__version__}, {made}. Every figure below was measured in this sweep; FFN
FLOPs are counted from the experts and weights each method actually used on the evaluation text.
</p>
<h2>Headline</h2><p>Lowest perplexity among the methods that run within each share of the dense
FFN FLOPs (oracle selection is left out: it computes every expert to choose some).</p>
{_headline_html(rows)}
<h2>Quality against FFN FLOPs</h2><div class="plots">{"".join(plots)}</div>
<h2>All results</h2>{_table(rows)}
{f'<h2>Sparsity profile</h2><div class="plots">{profile_html}</div>' if profile_html else ""}
<h2>Settings</h2><pre class="meta">{settings}</pre>
<script type="application/json" id="moefy-curves">{curves_json}</script>
</body></html>
"""


def write_report(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    config: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write :func:`render_report` to ``path`` atomically; return the path.

    An existing file at ``path`` is replaced only with ``overwrite``; a folder never is.

    Example:
        >>> write_report(result.rows, "runs/sweep/report.html", config=sweep_config)
    """
    text = render_report(rows, config=config)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
