"""The HTML report: one self-contained, offline ``report.html`` plus one file per figure.

Layout of a report folder written by :func:`write_report`::

    folder/report.html              the whole report; plotly.js is inlined once, nothing is fetched
    folder/figures/<name>.html      each figure on its own page
    folder/figures/plotly.min.js    plotly.js, shared by every figure page (loaded by relative path)

``report.html`` holds, in order: a header (title, subtitle), the ``summary`` as a key/value table,
the ``links`` (label -> relative href, e.g. the status file or the circuits folder), an index linking
every section (``#section-<id>``) and every figure (``#figure-<name>``), then the sections: intro
HTML, figures with captions, tables, notes.

**Self-check.** Every page carries a small inline script (in ``<head>``, so it runs before any other
script) that records JS errors (``window.onerror``, failed script loads, ``unhandledrejection``)
and, after ``load``, counts the plotly divs that really rendered (class ``js-plotly-plot`` with
``_fullLayout`` set, or containing an ``svg.main-svg``). It writes them on the ``<html>`` element::

    data-expected="<number of figures on the page>"
    data-rendered="<number that rendered>"
    data-errors="<JSON list of error messages>"
    data-done="1"                   once the count is final (all rendered, or ~5 s passed)

so that a headless browser's ``--dump-dom`` output proves the page rendered
(:func:`refusal_lens.report.browser.render_check`).

**Escaping.** Titles, captions, notes, table cells, summary entries and link labels are escaped
with :func:`html.escape`; ``Section.intro_html`` is inserted as is (trusted HTML from the caller).
"""

from __future__ import annotations

import html
import logging
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.offline

from refusal_lens.infra import durable

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
FIGURES_DIR = "figures"
PLOTLY_JS_FILE = "plotly.min.js"
MISSING_CELL = "–"
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")


def _check_slug(kind: str, value: str) -> None:
    """Raise ValueError unless ``value`` is a file- and anchor-safe slug (letters, digits, ``_``, ``-``)."""
    if not isinstance(value, str) or not _SLUG.match(value):
        raise ValueError(
            f"bad {kind} {value!r}: use 1-100 letters, digits, '_' or '-', starting with a letter or digit"
        )


@dataclass
class Table:
    """A table shown as HTML. ``rows`` are dicts keyed by column (missing keys show as "–", keys not
    in ``columns`` are not shown) or lists/tuples in column order (of exactly ``len(columns)`` cells)."""

    title: str
    columns: list[str]
    rows: list[dict | list]
    caption: str = ""


@dataclass
class FigureItem:
    """A plotly figure. ``name`` is a file-safe slug, unique within a report: it names
    ``figures/<name>.html`` and the anchor ``#figure-<name>``."""

    name: str
    figure: go.Figure
    caption: str = ""

    def __post_init__(self) -> None:
        _check_slug("figure name", self.name)


@dataclass
class Section:
    """A report section. ``id`` is a slug, unique within a report (anchor ``#section-<id>``);
    ``intro_html`` is trusted HTML inserted as is; ``notes`` are plain text, shown as a list."""

    id: str
    title: str
    intro_html: str = ""
    figures: list[FigureItem] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_slug("section id", self.id)


# ---------------------------------------------------------------------------------------------------
# small pieces


def format_cell(value: Any) -> str:
    """A table cell as escaped HTML text: None -> "–", floats to 4 significant digits, the rest str()."""
    if value is None:
        return MISSING_CELL
    if isinstance(value, bool):
        text = str(value)
    elif isinstance(value, numbers.Integral):
        text = str(int(value))
    elif isinstance(value, numbers.Real):
        text = f"{float(value):.4g}"
    else:
        text = str(value)
    return html.escape(text)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _row_cells(table: Table, row: Mapping | Sequence) -> list[Any]:
    """The cells of one row in column order; ValueError for a list row of the wrong length."""
    if isinstance(row, Mapping):
        return [row.get(column) for column in table.columns]
    cells = list(row)
    if len(cells) != len(table.columns):
        raise ValueError(
            f"table {table.title!r}: a row has {len(cells)} cells but there are {len(table.columns)} columns"
        )
    return cells


def table_html(table: Table) -> str:
    """One :class:`Table` as a ``<figure class="table">`` with a title, the table and its caption."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body_rows = []
    for row in table.rows:
        cells = _row_cells(table, row)
        tds = "".join(
            f'<td class="num">{format_cell(v)}</td>' if _is_number(v) else f"<td>{format_cell(v)}</td>"
            for v in cells
        )
        body_rows.append(f"<tr>{tds}</tr>")
    caption = f"<figcaption>{html.escape(table.caption)}</figcaption>" if table.caption else ""
    return (
        f'<figure class="table"><h3>{html.escape(table.title)}</h3>'
        f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body_rows)}</tbody></table></div>{caption}</figure>"
    )


def summary_html(summary: Mapping[str, Any]) -> str:
    """The summary as a two-column key/value table."""
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{format_cell(v)}</td></tr>" for k, v in summary.items()
    )
    return f'<section id="summary"><h2>Summary</h2><table class="kv"><tbody>{rows}</tbody></table></section>'


def links_html(links: Mapping[str, str]) -> str:
    """The links (label -> relative href) as a list."""
    items = "".join(
        f'<li><a href="{html.escape(href, quote=True)}">{html.escape(label)}</a></li>'
        for label, href in links.items()
    )
    return f'<section id="links"><h2>Files</h2><ul>{items}</ul></section>'


def index_html(sections: Sequence[Section]) -> str:
    """The table of contents: every section and, under it, every figure."""
    items = []
    for section in sections:
        figures = "".join(
            f'<li><a href="#figure-{f.name}">{html.escape(f.name)}</a>'
            f"{' – ' + html.escape(f.caption) if f.caption else ''}</li>"
            for f in section.figures
        )
        sub = f"<ul>{figures}</ul>" if figures else ""
        items.append(f'<li><a href="#section-{section.id}">{html.escape(section.title)}</a>{sub}</li>')
    return f'<nav id="index"><h2>Contents</h2><ol>{"".join(items)}</ol></nav>'


def figure_div(item: FigureItem, include_plotlyjs: bool | str = False) -> str:
    """The plotly ``<div>`` + script of one figure (div id ``plot-<name>``), without a page around it."""
    return item.figure.to_html(full_html=False, include_plotlyjs=include_plotlyjs, div_id=f"plot-{item.name}")


def figure_block(item: FigureItem) -> str:
    """One figure in the report: anchor, plot, caption and a link to its own page."""
    caption = html.escape(item.caption)
    own_page = f'<a href="{FIGURES_DIR}/{item.name}.html">open on its own</a>'
    return (
        f'<figure class="plot" id="figure-{item.name}">{figure_div(item)}'
        f"<figcaption><b>{html.escape(item.name)}</b>{' – ' + caption if caption else ''} ({own_page})"
        f"</figcaption></figure>"
    )


def section_html(section: Section) -> str:
    """One section: title, intro, figures, tables, notes."""
    parts = [f'<section class="report-section" id="section-{section.id}"><h2>{html.escape(section.title)}</h2>']
    if section.intro_html:
        parts.append(f'<div class="intro">{section.intro_html}</div>')
    parts.extend(figure_block(f) for f in section.figures)
    parts.extend(table_html(t) for t in section.tables)
    if section.notes:
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in section.notes)
        parts.append(f'<div class="notes"><h3>Notes</h3><ul>{notes}</ul></div>')
    parts.append("</section>")
    return "".join(parts)


def self_check_script(expected: int) -> str:
    """The inline ``<script>`` that records JS errors and the number of rendered plots on ``<html>``."""
    return f"""<script>
(function () {{
  var root = document.documentElement, errors = [], expected = {int(expected)};
  root.dataset.expected = String(expected);
  root.dataset.rendered = "0";
  root.dataset.errors = "[]";
  function record(msg) {{ errors.push(String(msg)); root.dataset.errors = JSON.stringify(errors); }}
  window.onerror = function (msg, src, line, col, err) {{
    record(String(msg) + (src ? " at " + src + ":" + line + ":" + col : ""));
  }};
  window.addEventListener("error", function (e) {{
    var t = e.target;
    if (t && t !== window && t.tagName) {{
      record("failed to load " + t.tagName.toLowerCase() + " " + (t.src || t.href || ""));
    }}
  }}, true);
  window.addEventListener("unhandledrejection", function (e) {{
    var r = e.reason;
    record("unhandled rejection: " + (r && (r.stack || r.message) || r));
  }});
  function count() {{
    var n = 0, els = document.querySelectorAll(".js-plotly-plot");
    for (var i = 0; i < els.length; i++) {{
      if (els[i]._fullLayout || els[i].querySelector("svg.main-svg")) {{ n++; }}
    }}
    return n;
  }}
  function check(triesLeft) {{
    try {{
      var n = count();
      root.dataset.rendered = String(n);
      if (n < expected && triesLeft > 0) {{ setTimeout(function () {{ check(triesLeft - 1); }}, 100); return; }}
    }} catch (err) {{
      record("self-check: " + (err && err.message || err));
    }}
    root.dataset.done = "1";
  }}
  window.addEventListener("load", function () {{ check(50); }});
}})();
</script>"""


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1200px; padding: 0 1.5rem 3rem; color: #1d1f23; line-height: 1.45; }
header { border-bottom: 2px solid #d0d4da; margin-bottom: 1rem; padding: 1rem 0 .5rem; }
header h1 { margin: 0 0 .25rem; font-size: 1.7rem; }
header p.subtitle { margin: 0; color: #555b66; }
h2 { font-size: 1.3rem; margin-top: 2rem; border-bottom: 1px solid #e3e6ea; padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin: 1rem 0 .4rem; }
a { color: #1f5fbf; }
nav#index ol, nav#index ul { margin: .2rem 0; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { border: 1px solid #d9dde3; padding: .25rem .55rem; text-align: left; vertical-align: top; }
thead th { background: #f1f3f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { background: #f7f8fa; font-weight: 600; }
figure { margin: 1rem 0 1.5rem; }
figure.plot { border: 1px solid #e3e6ea; border-radius: 4px; padding: .5rem; }
figcaption { color: #444a55; font-size: .9rem; margin-top: .35rem; }
div.scroll { overflow-x: auto; }
div.notes { background: #fbfaf3; border-left: 3px solid #e0c45c; padding: .2rem 1rem; margin: 1rem 0; }
"""


def _page(title: str, body: str, head_scripts: str) -> str:
    """A complete HTML document; ``head_scripts`` go first in ``<head>``."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n{head_scripts}\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _check_unique(sections: Sequence[Section]) -> None:
    """ValueError naming the first repeated section id or figure name."""
    seen_sections: set[str] = set()
    seen_figures: set[str] = set()
    for section in sections:
        _check_slug("section id", section.id)
        if section.id in seen_sections:
            raise ValueError(f"section id {section.id!r} is used twice in the report")
        seen_sections.add(section.id)
        for item in section.figures:
            _check_slug("figure name", item.name)
            if item.name in seen_figures:
                raise ValueError(f"figure name {item.name!r} is used twice in the report")
            seen_figures.add(item.name)


# ---------------------------------------------------------------------------------------------------
# files


def write_figure_page(folder: Path, item: FigureItem) -> Path:
    """Write ``folder/<name>.html``: one figure with the self-check script, loading ``plotly.min.js``
    from the same folder (which :func:`write_report` writes). Returns the path."""
    body = (
        f"<header><h1>{html.escape(item.name)}</h1>"
        f'<p class="subtitle"><a href="../{REPORT_FILE}#figure-{item.name}">back to the report</a></p></header>'
        f'<figure class="plot">{figure_div(item, include_plotlyjs="directory")}'
        f"{'<figcaption>' + html.escape(item.caption) + '</figcaption>' if item.caption else ''}</figure>"
    )
    path = folder / f"{item.name}.html"
    durable.write_text(path, _page(item.name, body, self_check_script(1)))
    return path


def _write_plotly_js(folder: Path, plotly_js: str) -> Path:
    """Write ``folder/plotly.min.js`` unless it already holds exactly this plotly.js."""
    path = folder / PLOTLY_JS_FILE
    if not (path.is_file() and path.read_text(encoding="utf-8") == plotly_js):
        durable.write_text(path, plotly_js)
    return path


def write_report(
    folder: str | os.PathLike,
    title: str,
    sections: Sequence[Section],
    *,
    summary: Mapping[str, Any] | None = None,
    links: Mapping[str, str] | None = None,
    subtitle: str = "",
) -> Path:
    """Write ``folder/report.html`` (self-contained, offline) and ``folder/figures/<name>.html`` for
    every figure (sharing ``folder/figures/plotly.min.js``); overwrites an existing report.

    Raises ValueError for a bad or repeated section id / figure name, or a table row of the wrong
    length, before writing anything. Returns the path of ``report.html``.
    """
    _check_unique(sections)
    sections_markup = [section_html(s) for s in sections]  # renders tables: ValueError before writing
    folder = Path(folder)
    figures_dir = folder / FIGURES_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)

    plotly_js = plotly.offline.get_plotlyjs()
    _write_plotly_js(figures_dir, plotly_js)
    items = [item for s in sections for item in s.figures]
    for item in items:
        write_figure_page(figures_dir, item)

    header = f"<header><h1>{html.escape(title)}</h1>"
    if subtitle:
        header += f'<p class="subtitle">{html.escape(subtitle)}</p>'
    header += "</header>"
    body = [header]
    if summary:
        body.append(summary_html(summary))
    if links:
        body.append(links_html(links))
    body.append(index_html(sections))
    body.extend(sections_markup)
    head_scripts = f'{self_check_script(len(items))}\n<script type="text/javascript">{plotly_js}</script>'

    path = folder / REPORT_FILE
    durable.write_text(path, _page(title, "\n".join(body), head_scripts))
    log.info("wrote %s (%d sections, %d figures)", path, len(sections), len(items))
    return path
