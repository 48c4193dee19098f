"""The executed notebooks as a reader sees them: rendered to HTML by nbconvert and laid out by a real browser
(Chromium, driven by Playwright), so their height and how far down the findings start are measured, not guessed.

A report is readable when the findings come within the first few screens and the page is not a scroll through
progress-bar refreshes (papermill once stored 3,184 outputs in 05: 75,000 px, findings 72,000 px down). Set-up:
`make render-check` (nbconvert and Playwright from PyPI; Chromium from the system's packages: Playwright's own
browser download is not reachable offline).
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qlib.core.errors import QlabError

SCREEN = (1280, 900)          # a laptop's browser window, in CSS pixels
FINDINGS_SCREENS = 4.0        # the findings heading must start within this many screens
MAX_HEIGHT_PX = 15_000        # and the whole report within this height (issue 31's bar)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
FIND = """() => { const h = [...document.querySelectorAll('h1, h2, h3')]
                   .find(e => e.textContent.trim().startsWith('Findings'));
                   return h ? h.getBoundingClientRect().top + window.scrollY : null; }"""


@dataclass
class Rendered:
    notebook: str
    html_bytes: int
    height_px: int
    findings_px: int | None   # top of the first "Findings" heading (None: the notebook has none)

    def problems(self, findings_screens: float = FINDINGS_SCREENS, max_px: int = MAX_HEIGHT_PX) -> list[str]:
        """What a reader would hit: no findings, findings too far down, a page too long."""
        screen, out = SCREEN[1], []
        if self.findings_px is None:
            out.append(f"{self.notebook}: no 'Findings' heading")
        elif self.findings_px > findings_screens * screen:
            out.append(f"{self.notebook}: findings start {self.findings_px / screen:.1f} screens down "
                       f"(at most {findings_screens:g})")
        if self.height_px > max_px:
            out.append(f"{self.notebook}: {self.height_px:,} px tall (at most {max_px:,})")
        return out


def chromium() -> str:
    """The system's Chromium (Debian/Ubuntu package `chromium`), or one line saying how to get it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise QlabError("no Chromium found: install the system package (`apt-get install chromium`) or run "
                    "`make render-check`, which does")


def to_html(notebook: Path, out: Path) -> Path:
    """nbconvert's JupyterLab template, images embedded: the file a reader opens."""
    try:
        from nbconvert import HTMLExporter
    except ImportError:
        raise QlabError("nbconvert is not installed: pip install -e '.[report]' (or `make render-check`)") from None
    body, _ = HTMLExporter(template_name="lab", embed_images=True).from_filename(str(notebook))
    path = out / (notebook.stem + ".html")
    path.write_text(body, encoding="utf-8")
    return path


def measure(notebooks: list[Path], browser: str | None = None) -> list[Rendered]:
    """Each notebook rendered and laid out at `SCREEN`: HTML size, page height, the findings' offset."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise QlabError("playwright is not installed: pip install -e '.[report]' (or `make render-check`)") from None
    missing = [str(n) for n in notebooks if not n.is_file()]
    if missing:
        raise QlabError(f"no executed notebook at {', '.join(missing)} (run `make run` first)")
    out = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser or chromium(), args=list(FLAGS))
        page = b.new_page(viewport={"width": SCREEN[0], "height": SCREEN[1]})
        for nb in notebooks:
            html = to_html(nb, Path(tmp))
            page.goto(html.as_uri(), wait_until="load")
            out.append(Rendered(nb.name, html.stat().st_size, int(page.evaluate(
                "document.documentElement.scrollHeight")), _px(page.evaluate(FIND))))
        b.close()
    return out


def _px(v: float | None) -> int | None:
    return None if v is None else int(v)


def table(rendered: list[Rendered]) -> str:
    """Markdown: each report's size, height and where its findings start, in screens of `SCREEN`."""
    h = SCREEN[1]
    lines = ["| notebook | HTML (KiB) | height (px) | screens | findings at (screen) |", "|---|---|---|---|---|"]
    for r in rendered:
        at = "–" if r.findings_px is None else f"{r.findings_px / h:.1f}"
        lines.append(f"| {r.notebook} | {r.html_bytes / 1024:.0f} | {r.height_px:,} | {r.height_px / h:.1f} | {at} |")
    return "\n".join(lines)
