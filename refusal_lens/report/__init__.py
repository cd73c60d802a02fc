"""Report writing: a self-contained offline HTML report (:mod:`.html`) and a headless-Chromium
check that it renders (:mod:`.browser`)."""

from refusal_lens.report.browser import RenderResult, find_chromium, render_check, screenshot
from refusal_lens.report.html import FigureItem, Section, Table, write_report

__all__ = ["FigureItem", "RenderResult", "Section", "Table", "find_chromium", "render_check", "screenshot",
           "write_report"]
