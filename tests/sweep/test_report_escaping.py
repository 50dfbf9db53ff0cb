"""report.html with hostile names in its rows: nothing injected runs, every name survives.

The page is parsed the way a browser tokenises it (Python's html.parser, and lxml's HTML parser
where installed): a name that closed the JSON ``<script>`` element or an attribute would show up
as an extra element or attribute.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from moefy.cli.main import main
from moefy.sweep import curves, render_report, write_report
from moefy.sweep.report import QUALITY_PLOTS

SCRIPT_CLOSE = "</script><script>alert(1)</script>"
HOSTILE = (
    SCRIPT_CLOSE,
    '"><img src=x onerror=alert(2)>',
    "<!--<script>",
    "</SCRIPT ><svg onload=alert(3)>",
    "a&amp;b \u2028 \u2029 $\\frac{$ _under",
)
# the elements a clean report holds; an injected name would add <img onerror>, <svg>, <script>
SCRIPTS_IN_A_REPORT = 1


def _hostile_rows(text_values: bool = True) -> list[dict]:
    """Rows named by :data:`HOSTILE`; ``text_values``: text levels and values too (what a
    Python caller may pass; ``moefy report`` refuses such a rows.json)."""
    rows = [
        {"method": "dense", "level": None, "ffn_flops_fraction": 1.0, "perplexity": 10.0},
    ]
    for i, name in enumerate(HOSTILE):
        rows.append(
            {
                "method": name,
                "family": name,
                "level": name if text_values and i % 2 else 0.5,
                "level_meaning": name,
                "ffn_flops_fraction": 0.3 + 0.01 * i,
                "perplexity": 12.0 + i,
                "perplexity_ratio": 1.2 + 0.1 * i,
                "kl_to_dense": 0.1 * (i + 1),
                "top1_agreement": 0.9,
                name: name if text_values else 1.0,  # a hostile key (and value)
                f"{name}_accuracy": 0.5,
            }
        )
    return rows


class _Elements(HTMLParser):
    """Every start tag with its attributes, and the text of each <script> element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def _expected_payload(rows: list[dict]) -> dict:
    return {metric: curves(rows, metric) for metric, _, _ in QUALITY_PLOTS}


def _check_page(page: str, rows: list[dict]) -> None:
    parser = _Elements()
    parser.feed(page)
    parser.close()
    tags = [tag for tag, _ in parser.tags]
    assert tags.count("script") == SCRIPTS_IN_A_REPORT, tags
    assert "svg" not in tags
    for tag, attrs in parser.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "img":  # only the plots: embedded PNG, nothing an attacker chose
            assert attrs["src"].startswith("data:image/png;base64,"), attrs
            assert set(attrs) == {"alt", "src"}, attrs
    script_attrs = next(attrs for tag, attrs in parser.tags if tag == "script")
    assert script_attrs == {"type": "application/json", "id": "moefy-curves"}
    payload = json.loads(parser.scripts[0])
    assert payload == _expected_payload(rows)
    assert set(HOSTILE) <= set(payload["perplexity_ratio"])  # every name survived the trip
    assert "</script" not in parser.scripts[0].lower() and "<!--" not in parser.scripts[0]


def test_hostile_names_are_escaped_in_every_context():
    rows = _hostile_rows()
    page = render_report(rows, title="<b>t</b>")
    _check_page(page, rows)
    # the table and the headline show the names as text: escaped, never as markup
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "onerror=alert(2)>" not in page
    assert "&lt;b&gt;t&lt;/b&gt;" in page


def test_lxml_sees_the_same_page():
    etree = pytest.importorskip("lxml.etree")
    lxml_html = pytest.importorskip("lxml.html")
    rows = _hostile_rows()
    document = lxml_html.document_fromstring(render_report(rows))
    scripts = document.findall(".//script")
    assert len(scripts) == SCRIPTS_IN_A_REPORT
    assert not document.findall(".//svg")
    for element in document.iter(etree.Element):
        assert not any(name.startswith("on") for name in element.attrib), element.attrib
    assert json.loads(scripts[0].text) == _expected_payload(rows)


def test_report_cli_rebuilds_a_safe_page_from_hostile_rows(tmp_path):
    rows = _hostile_rows(text_values=False)
    (tmp_path / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    assert main(["report", str(tmp_path)]) == 0
    _check_page((tmp_path / "report.html").read_text(encoding="utf-8"), rows)


def test_write_report_round_trips_hostile_names(tmp_path):
    rows = _hostile_rows()
    path = write_report(rows, tmp_path / "report.html")
    _check_page(path.read_text(encoding="utf-8"), rows)
