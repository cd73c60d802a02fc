"""The HTML report writer (offline, self-contained, escaped) and the headless-Chromium render check.

Browser tests need Chromium (``apt-get install chromium``; ``make setup`` installs it as root). Without
it they FAIL with the install hint, unless ``REFUSAL_LENS_SKIP_BROWSER=1`` (then they skip).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline
import pytest

from refusal_lens.report import FigureItem, Section, Table, find_chromium, render_check, screenshot, write_report
from refusal_lens.report.browser import INSTALL_HINT, parse_render_result
from refusal_lens.report.html import format_cell, self_check_script

FIGURE_NAMES = ["heat", "bar", "line"]
SECTION_IDS = ["overview", "details"]
NASTY = "<script>x</script>"


def make_sections() -> list[Section]:
    heat = go.Figure(go.Heatmap(z=[[1, 2, 3], [4, 5, 6]], x=["a", "b", "c"], y=["p", "q"]))
    bar = go.Figure(go.Bar(x=["refuse", "comply"], y=[3, 5]))
    line = go.Figure(go.Scatter(x=[0, 1, 2, 3], y=[0.1, 0.4, 0.2, 0.9], mode="lines+markers"))
    table = Table(
        title="Scores",
        columns=["prompt", "score", "note"],
        rows=[
            {"prompt": NASTY, "score": 3.14159265, "note": None},
            ["plain", 2, "ok"],
            {"prompt": "missing note", "score": 1e-7},
        ],
        caption="a table with escaping, None and floats",
    )
    return [
        Section(
            id="overview",
            title="Overview",
            intro_html="<p>Two figures.</p>",
            figures=[FigureItem("heat", heat, "a heatmap"), FigureItem("bar", bar, "a bar chart")],
        ),
        Section(id="details", title="Details", figures=[FigureItem("line", line)], tables=[table],
                notes=["a note with <b>markup</b>"]),
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return write_report(
        tmp_path_factory.mktemp("report"),
        "Refusal report <test>",
        make_sections(),
        summary={"model": "tiny", "refusal rate": 0.123456, "n prompts": 12, "missing": None},
        links={"status file": "status.json", "circuits": "circuits/"},
        subtitle="built by test_report",
    )


def require_browser() -> None:
    """Skip when REFUSAL_LENS_SKIP_BROWSER=1; fail with the install hint when Chromium is missing."""
    if os.environ.get("REFUSAL_LENS_SKIP_BROWSER") == "1":
        pytest.skip("REFUSAL_LENS_SKIP_BROWSER=1: headless-Chromium render checks skipped")
    if find_chromium() is None:
        pytest.fail(f"Chromium not found: {INSTALL_HINT} (or set REFUSAL_LENS_SKIP_BROWSER=1 to skip)")


# --- the files --------------------------------------------------------------------------------------


def test_report_layout(report):
    folder = report.parent
    assert report == folder / "report.html" and report.is_file()
    for name in FIGURE_NAMES:
        page = (folder / "figures" / f"{name}.html").read_text(encoding="utf-8")
        assert 'src="plotly.min.js"' in page and f'id="plot-{name}"' in page
        assert "data-expected" in page or "dataset.expected" in page
    assert [p.name for p in (folder / "figures").glob("*.js")] == ["plotly.min.js"]
    assert (folder / "figures" / "plotly.min.js").read_text(encoding="utf-8") == plotly.offline.get_plotlyjs()
    assert not [p for p in folder.rglob("*.tmp")]


def test_report_is_self_contained(report):
    text = report.read_text(encoding="utf-8")
    plotly_js = plotly.offline.get_plotlyjs()
    assert text.count(plotly_js[:2000]) == 1
    assert text.count(plotly_js[-2000:]) == 1
    remote = re.findall(r"""<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", text, re.IGNORECASE)
    assert remote == []
    assert not re.search(r"""<script\b[^>]*\bsrc\s*=""", text, re.IGNORECASE)  # every script is inline
    for name in FIGURE_NAMES:
        page = (report.parent / "figures" / f"{name}.html").read_text(encoding="utf-8")
        assert plotly_js[:2000] not in page
        assert not re.search(r"""\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", page, re.IGNORECASE)


def test_report_index_and_content(report):
    text = report.read_text(encoding="utf-8")
    index = re.search(r'<nav id="index">(.*?)</nav>', text, re.DOTALL).group(1)
    for sid in SECTION_IDS:
        assert f'href="#section-{sid}"' in index and f'id="section-{sid}"' in text
    for name in FIGURE_NAMES:
        assert f'href="#figure-{name}"' in index and f'id="figure-{name}"' in text
        assert f'id="plot-{name}"' in text and f'href="figures/{name}.html"' in text
    assert "&lt;script&gt;x&lt;/script&gt;" in text and NASTY not in text
    assert "<td>–</td>" in text  # None
    assert '<td class="num">3.142</td>' in text and '<td class="num">1e-07</td>' in text
    assert "Refusal report &lt;test&gt;" in text and "a note with &lt;b&gt;markup&lt;/b&gt;" in text
    assert '<a href="status.json">status file</a>' in text and '<a href="circuits/">circuits</a>' in text
    assert "<td>0.1235</td>" in text  # summary float
    assert "<p>Two figures.</p>" in text  # intro_html is trusted


def test_format_cell():
    assert format_cell(None) == "–"
    assert format_cell(2.0 / 3) == "0.6667"
    assert format_cell(123456.789) == "1.235e+05"
    assert format_cell(7) == "7"
    assert format_cell(True) == "True"
    assert format_cell('"&') == "&quot;&amp;"


def test_overwrite(tmp_path):
    first = write_report(tmp_path, "one", make_sections())
    second = write_report(tmp_path, "two", make_sections()[:1])
    assert first == second
    assert "<title>two</title>" in second.read_text(encoding="utf-8")
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_names(tmp_path):
    fig = go.Figure(go.Bar(y=[1]))
    with pytest.raises(ValueError, match="bad figure name 'bad name!'"):
        FigureItem("bad name!", fig)
    with pytest.raises(ValueError, match="'../escape'"):
        FigureItem("../escape", fig)
    with pytest.raises(ValueError, match="bad section id"):
        Section(id="has space", title="x")
    twice = [Section("a", "A", figures=[FigureItem("same", fig)]), Section("b", "B", figures=[FigureItem("same", fig)])]
    with pytest.raises(ValueError, match="figure name 'same' is used twice"):
        write_report(tmp_path / "dup", "t", twice)
    with pytest.raises(ValueError, match="section id 'a' is used twice"):
        write_report(tmp_path / "dup", "t", [Section("a", "A"), Section("a", "B")])
    short_row = Table("t", ["x", "y"], [[1]])
    with pytest.raises(ValueError, match="1 cells but there are 2 columns"):
        write_report(tmp_path / "short", "t", [Section("a", "A", tables=[short_row])])
    assert not (tmp_path / "dup").exists() and not (tmp_path / "short").exists()  # nothing written


def test_parse_render_result():
    dom = ('<html lang="en" data-expected="3" data-rendered="2" '
           'data-errors="[&quot;ReferenceError: x > y&quot;]" data-done="1"><head></head></html>')
    result = parse_render_result(dom)
    assert (result.rendered, result.expected, result.errors, result.done) == (2, 3, ["ReferenceError: x > y"], True)
    assert not result.ok
    with pytest.raises(RuntimeError, match="no render check"):
        parse_render_result("<html><head></head><body></body></html>")


def test_missing_chromium_is_an_error(report, monkeypatch):
    monkeypatch.setenv("REFUSAL_LENS_CHROMIUM", "/nonexistent/chromium")
    assert find_chromium() is None
    with pytest.raises(RuntimeError, match="apt-get install chromium"):
        render_check(report)


# --- headless Chromium ------------------------------------------------------------------------------


def test_report_renders_in_chromium(report):
    require_browser()
    result = render_check(report)
    assert result.errors == []
    assert result.rendered == result.expected == 3
    assert result.done


def test_figure_page_renders_in_chromium(report):
    require_browser()
    result = render_check(report.parent / "figures" / "heat.html")
    assert (result.rendered, result.expected, result.errors) == (1, 1, [])


def test_render_check_detects_a_broken_figure(report, tmp_path):
    """A page with one good plot and one whose script has a syntax error: 1 of 2 rendered, error recorded."""
    require_browser()
    shutil.copy(report.parent / "figures" / "plotly.min.js", tmp_path / "plotly.min.js")
    good = go.Figure(go.Bar(y=[1, 2])).to_html(
        full_html=False, include_plotlyjs="directory", div_id="plot-good")
    broken = ('<div id="plot-broken"></div>'
              '<script>Plotly.newPlot("plot-broken", [{"type": "bar", "y": [1, 2]}], {}); )(</script>')
    page = tmp_path / "broken.html"
    page.write_text(f"<!DOCTYPE html><html><head>{self_check_script(2)}</head><body>{good}{broken}</body></html>",
                    encoding="utf-8")
    result = render_check(page)
    assert result.expected == 2
    assert result.rendered == 1
    assert any("SyntaxError" in e for e in result.errors), result.errors
    assert not result.ok


def test_render_check_detects_missing_plotly_js(report, tmp_path):
    """A figure page moved away from its plotly.min.js: nothing renders and the failed load is recorded."""
    require_browser()
    page = tmp_path / "bar.html"
    shutil.copy(report.parent / "figures" / "bar.html", page)
    result = render_check(page)
    assert (result.rendered, result.expected) == (0, 1)
    assert any("failed to load script" in e for e in result.errors), result.errors
    assert any("Plotly is not defined" in e for e in result.errors), result.errors


def test_screenshot(report, tmp_path):
    require_browser()
    png = screenshot(report, tmp_path / "shot.png", width=800, height=600)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (800, 600)
