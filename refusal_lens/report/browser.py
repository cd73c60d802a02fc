"""Headless Chromium checks of report pages: did every plot render, were there JS errors, and a screenshot.

:func:`render_check` opens a page written by :mod:`refusal_lens.report.html` with
``chromium --headless --dump-dom`` and reads what the page's self-check script wrote on its
``<html>`` element (``data-rendered``, ``data-expected``, ``data-errors``, ``data-done``; see
:mod:`refusal_lens.report.html`). Chromium is found by :func:`find_chromium`: the environment
variable ``REFUSAL_LENS_CHROMIUM`` (a path or a command name), else ``chromium``,
``chromium-browser`` or ``google-chrome`` on ``PATH``. On Debian: ``apt-get install chromium``.

Every run gets a fresh temporary profile (``--user-data-dir``), so runs never share state or
profile locks, and Chromium is killed with its whole process group on timeout.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

log = logging.getLogger(__name__)

CHROMIUM_ENV = "REFUSAL_LENS_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "install Debian's chromium: apt-get install chromium"
VIRTUAL_TIME_BUDGET_MS = 15000

# Flags for every run. --no-sandbox: Chromium refuses to run as root with its sandbox (containers, CI);
# --disable-dev-shm-usage: a small /dev/shm (Docker's 64 MB) crashes renderers; --disable-gpu: no GPU
# process in a headless box; the rest keep a fresh profile quiet and offline.
BASE_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--hide-scrollbars",
)


@dataclass
class RenderResult:
    """What a page's self-check script reported: plots that rendered, plots expected, JS errors.
    ``done`` is False when the page's final count had not been written yet (e.g. still waiting)."""

    rendered: int
    expected: int
    errors: list[str] = field(default_factory=list)
    done: bool = True

    @property
    def ok(self) -> bool:
        """Every expected plot rendered and there was no JS error."""
        return self.rendered == self.expected and not self.errors


def find_chromium() -> str | None:
    """The Chromium executable: ``$REFUSAL_LENS_CHROMIUM`` if set (None if it names nothing runnable),
    else the first of ``chromium``, ``chromium-browser``, ``google-chrome`` on PATH, else None."""
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        found = shutil.which(configured)
        if found is None:
            log.warning("%s=%r is not an executable", CHROMIUM_ENV, configured)
        return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _require_chromium() -> str:
    """The Chromium executable, or RuntimeError with the install hint."""
    chromium = find_chromium()
    if chromium is None:
        where = f"${CHROMIUM_ENV}={os.environ[CHROMIUM_ENV]!r} is not runnable" if os.environ.get(CHROMIUM_ENV) \
            else f"none of {', '.join(CHROMIUM_NAMES)} is on PATH"
        raise RuntimeError(f"Chromium not found ({where}); {INSTALL_HINT}")
    return chromium


def _page_url(html_path: str | os.PathLike) -> str:
    """``file://`` URL of an existing page; FileNotFoundError otherwise (Chromium would exit 0 anyway)."""
    path = Path(html_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such page: {path}")
    return path.as_uri()


def _run_chromium(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run Chromium with :data:`BASE_FLAGS`, a throwaway profile and ``args``; RuntimeError if it
    fails or runs past ``timeout_s`` (then its whole process group is killed)."""
    chromium = _require_chromium()
    with tempfile.TemporaryDirectory(prefix="refusal-lens-chromium-") as profile:
        cmd = [chromium, *BASE_FLAGS, f"--user-data-dir={profile}", *args]
        log.debug("running %s", " ".join(cmd))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"Chromium ran past {timeout_s} s: {' '.join(cmd)}") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"Chromium failed (exit {proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


class _HtmlTagAttrs(HTMLParser):
    """Collects the attributes of the first ``<html>`` start tag."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.attrs: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "html" and self.attrs is None:
            self.attrs = {k: v or "" for k, v in attrs}


_HTML_TAG = re.compile(r"""<html\b(?:[^>"']|"[^"]*"|'[^']*')*>""", re.IGNORECASE)


def parse_render_result(dom: str) -> RenderResult:
    """Read ``data-rendered``/``data-expected``/``data-errors``/``data-done`` from a dumped DOM's
    ``<html>`` tag; RuntimeError if they are missing (the page has no self-check or never ran it)."""
    match = _HTML_TAG.search(dom)
    parser = _HtmlTagAttrs()
    if match:
        parser.feed(match.group(0))
    attrs = parser.attrs or {}
    if "data-rendered" not in attrs or "data-expected" not in attrs:
        head = html.escape(dom[:300]) if dom else "(empty output)"
        raise RuntimeError(f"the page reported no render check (no data-rendered on <html>); DOM starts: {head}")
    try:
        errors = json.loads(attrs.get("data-errors") or "[]")
    except json.JSONDecodeError:
        errors = [f"unreadable data-errors: {attrs.get('data-errors')!r}"]
    return RenderResult(
        rendered=int(attrs["data-rendered"]),
        expected=int(attrs["data-expected"]),
        errors=[str(e) for e in errors],
        done=attrs.get("data-done") == "1",
    )


def render_check(html_path: str | os.PathLike, timeout_s: float = 60) -> RenderResult:
    """Open ``html_path`` in headless Chromium, let it run (virtual time budget of 15 s, so timers
    fire at once) and return what its self-check script recorded. RuntimeError if Chromium is
    missing, fails, times out, or the page carries no self-check."""
    url = _page_url(html_path)
    proc = _run_chromium([f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}", "--dump-dom", url], timeout_s)
    if not proc.stdout.strip():
        raise RuntimeError(f"Chromium printed no DOM for {url}:\n{proc.stderr[-3000:]}")
    result = parse_render_result(proc.stdout)
    log.info("render check %s: %d/%d plots, %d errors", url, result.rendered, result.expected, len(result.errors))
    return result


def screenshot(
    html_path: str | os.PathLike,
    png_path: str | os.PathLike,
    width: int = 1400,
    height: int = 1800,
    timeout_s: float = 60,
) -> Path:
    """Save a ``width`` x ``height`` PNG of the top of ``html_path`` (after its scripts ran) to
    ``png_path``; RuntimeError if Chromium is missing or writes no picture. Returns the PNG path."""
    url = _page_url(html_path)
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    proc = _run_chromium(
        [
            f"--window-size={int(width)},{int(height)}",
            f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
            "--run-all-compositor-stages-before-draw",
            f"--screenshot={png}",
            url,
        ],
        timeout_s,
    )
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot to {png}:\n{proc.stderr[-3000:]}")
    log.info("screenshot of %s -> %s", url, png)
    return png
