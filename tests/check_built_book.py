"""Open every built chapter page in headless Chromium, screenshot it, and fail on what a reader would miss.

Run by `make book` as its last step:  python tests/check_built_book.py _build/html --screenshots DIR
A page fails when a cell output holds a traceback, a plot image is missing (a broken <img>, or a
figure that printed as text instead of an image, or a plot without a caption), a widget view did
not render, prose dollar amounts were rendered as maths, a cell shows a progress bar or the Trainer's
log table (frozen in a static page, they are noise), or the stylesheet that wraps long lines is not
linked. ``--expect
PAGE=images:N,widgets:M`` also requires at least that many of each on a page.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bs4 import BeautifulSoup

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# What a widget shows (an HTML widget's content, an Output widget's outputs) as opposed to its controls.
SHOWN_CONTENT = ".widget-html-content, .widget-output"
WRAP_STYLESHEET = "cells.css"  # book/_css/cells.css, linked by _config.yml's html_css_files
# tqdm's text ("kept:  40%|####      | 2/5 [00:03<00:04, ...]") and transformers' Trainer's log table.
PROGRESS_TEXT = re.compile(r"\d+%\|.*\|\s*\d+/\d+|\d+/\d+ \[\d+:\d+<|\bNo log\b")


@dataclass
class PageReport:
    page: str
    images: int = 0
    widget_views: int = 0
    rendered_widgets: int = 0
    problems: list[str] = field(default_factory=list)


def inspect_page(page: Path, static_html: str, rendered_html: str) -> PageReport:
    """Return what the page shows: image and widget counts, and every problem found."""
    report = PageReport(page.name)
    static, rendered = BeautifulSoup(static_html, "html.parser"), BeautifulSoup(rendered_html, "html.parser")
    for output in static.select("div.cell_output"):
        text = output.get_text(" ")
        if "Traceback (most recent call last)" in text or output.select(".traceback"):
            report.problems.append(f"traceback in a cell output: {text.strip()[:120]!r}")
        images = output.find_all("img")
        for image in images:
            figure = image.find_parent("figure")
            if figure is None or figure.find("figcaption") is None or not figure.figcaption.get_text(strip=True):
                report.problems.append(f"a plot without a caption (cell metadata mystnb.figure.caption): {image.get('src')!r}")
        if PROGRESS_TEXT.search(text):
            report.problems.append(f"progress-bar or log-table output in a cell (make book sets ALPACA_NB_PROGRESS=0): "
                                   f"{PROGRESS_TEXT.search(text).group(0)[:80]!r}")
        if "<Figure size" in text and not images:
            report.problems.append("a figure printed as text, not as an image")
        report.images += len(images)
    for image in static.select("article img"):  # plots and the chapters' own figures alike
        target = (page.parent / image.get("src", "")).resolve()
        if not image.get("src") or not target.is_file() or target.stat().st_size == 0:
            report.problems.append(f"image missing: {image.get('src')!r}")
    for math in static.select("article span.math"):
        # MyST reads a pair of "$" in one paragraph as inline maths: "$500 ... $100" loses its dollars.
        if re.match(r"\\?\(?\s*\d", math.get_text().strip()):
            report.problems.append(f"dollar amounts rendered as maths (write \\$ in prose): {math.get_text()[:60]!r}")
    if any("ProgressModel" in state.get_text() for state in static.find_all("script", type=WIDGET_STATE)):
        report.problems.append("a progress-bar widget saved in the page (make book sets ALPACA_NB_PROGRESS=0)")
    if static.select("div.cell_output") and not static.find("link", href=re.compile(re.escape(WRAP_STYLESHEET))):
        report.problems.append(f"the page does not link {WRAP_STYLESHEET}: long lines would scroll sideways")
    report.widget_views = len(static.find_all("script", type=WIDGET_VIEW))
    report.rendered_widgets = len(rendered.select("div.widget-subarea .jupyter-widgets"))
    rendered_views = len(rendered.select("div.widget-subarea"))
    if rendered_views < report.widget_views:
        report.problems.append(f"{report.widget_views - rendered_views} of {report.widget_views} widget views did not render")
    for view in rendered.select("div.widget-subarea"):
        if not any(part.get_text(strip=True) or part.find(["img", "table"]) for part in view.select(SHOWN_CONTENT)):
            controls = " ".join(view.get_text(" ", strip=True).split())[:80]
            report.problems.append(f"a widget shows nothing but its controls in the static page ({controls!r}): "
                                   "compute its first state when the cell runs")
    return report


def check_expectations(report: PageReport, expected: dict[str, int]) -> None:
    """Add a problem to ``report`` for each expected count it falls short of."""
    found = {"images": report.images, "widgets": report.widget_views}
    for kind, minimum in expected.items():
        if found[kind] < minimum:
            report.problems.append(f"expected at least {minimum} {kind}, found {found[kind]}")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("check_built_book: no Chromium found (Debian/Ubuntu: apt-get install chromium)")


def render(browser: str, page: Path, screenshot: Path) -> str:
    """Return the page's DOM after its scripts ran, and save a full-height screenshot."""
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000"]
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
        subprocess.run([*common, "--window-size=1280,9000", f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=120, check=True)
    return dom


def parse_expectations(items: list[str]) -> dict[str, dict[str, int]]:
    """Parse ``PAGE=images:N,widgets:M`` items into {page: {kind: N}}."""
    expectations = {}
    for item in items:
        page, _, spec = item.partition("=")
        expectations[page] = {kind: int(count) for kind, count in (part.split(":") for part in spec.split(","))}
    return expectations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", type=Path)
    parser.add_argument("--screenshots", type=Path, required=True)
    parser.add_argument("--expect", action="append", default=[], help="PAGE=images:N,widgets:M")
    args = parser.parse_args(argv)
    expectations = parse_expectations(args.expect)
    pages = sorted((args.html_dir / "book").glob("*.html"))
    if not pages:
        sys.exit(f"check_built_book: no chapter pages in {args.html_dir / 'book'}")
    args.screenshots.mkdir(parents=True, exist_ok=True)
    browser, failed = chromium(), False
    for page in pages:
        screenshot = args.screenshots / f"{page.stem}.png"
        report = inspect_page(page, page.read_text(encoding="utf-8"), render(browser, page, screenshot))
        check_expectations(report, expectations.pop(page.stem, {}))
        status = "FAIL" if report.problems else "ok"
        print(f"{status:4s} {page.stem:24s} images={report.images} widgets={report.widget_views} "
              f"rendered={report.rendered_widgets} screenshot={screenshot}")
        for problem in report.problems:
            print(f"     - {problem}")
        failed |= bool(report.problems)
    for missing in expectations:
        print(f"FAIL {missing}: expected page not built")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
