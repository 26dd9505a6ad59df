"""Open every built chapter page in headless Chromium, screenshot it, and fail on what a reader would miss.

Run by `make book` as its last step:  python tests/check_built_book.py _build/html --screenshots DIR
A page fails when a cell output holds a traceback, a plot image is missing (a broken <img>, or a
figure that printed as text instead of an image, or a plot without a caption), a widget view did
not render, prose dollar amounts were rendered as maths, a cell shows a progress bar or the Trainer's
log table (frozen in a static page, they are noise), or the stylesheet that wraps long lines is not
linked. Then it uses every widget control as a reader would (tests/browser.py's Selenium Chromium): a control in
a widget that acts without a kernel (alpaca_nb/static_widgets.py) must change what its widget shows; a control in a
widget that needs a kernel must say so on itself, with the command that gives one (make lab); any other control,
interactive-looking but inert, fails the page. ``--expect PAGE=images:N,widgets:M,static:K`` also requires at least
that many plots, widget views and widgets that act without a kernel on a page.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bs4 import BeautifulSoup

from browser import headless_chromium

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# What a widget shows (an HTML widget's content, an Output widget's outputs) as opposed to its controls.
SHOWN_CONTENT = ".widget-html-content, .widget-output, .alpaca-nb-output"
WRAP_STYLESHEET = "cells.css"  # book/_css/cells.css, linked by _config.yml's html_css_files
# tqdm's text ("kept:  40%|####      | 2/5 [00:03<00:04, ...]") and transformers' Trainer's log table.
PROGRESS_TEXT = re.compile(r"\d+%\|.*\|\s*\d+/\d+|\d+/\d+ \[\d+:\d+<|\bNo log\b")


@dataclass
class PageReport:
    page: str
    images: int = 0
    widget_views: int = 0
    rendered_widgets: int = 0
    static_widgets: int = 0  # widgets whose every control acted in the page
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


# The widget controls a reader can use, and what a reader's use of one does (the events a browser fires).
CONTROLS = "input, select, textarea, button, .slider, .widget-readout"
CLASSIFY = """
const control = arguments[0];
const kernel = control.closest('.alpaca-nb-needs-kernel'), acting = control.closest('.alpaca-nb-static');
if (kernel) return ['kernel', getComputedStyle(kernel, '::before').content,
                    control.matches('textarea[readonly]') || getComputedStyle(control).pointerEvents === 'none'];
if (acting) return ['static', '', true];
return ['inert', '', false];
"""
# Tries a reader's uses of a control in turn (each option, each end of a range...) until what its widget shows
# changes; returns whether one did.
USE = """
const control = arguments[0];
const output = control.closest('.alpaca-nb-static').querySelector('.alpaca-nb-output');
const before = output ? output.textContent : null;
const tries = [];
if (control.multiple) tries.push(() => { for (const option of control.options) option.selected = !option.selected; });
else if (control.tagName === 'SELECT') for (let step = 1; step < control.options.length; step++)
  tries.push(() => { control.selectedIndex = (control.selectedIndex + 1) % control.options.length; });
else if (control.type === 'checkbox') tries.push(() => { control.checked = !control.checked; });
else if (control.type === 'range') tries.push(() => { control.value = control.max; }, () => { control.value = control.min; });
else if ('value' in control) for (const text of [control.dataset.probe || 'a', 'zq-no-such-text', ''])
  tries.push(() => { control.value = text; });
for (const use of tries) {
  use();
  for (const name of ['input', 'change']) control.dispatchEvent(new Event(name, {bubbles: true}));
  if (output && output.textContent !== before) return true;
}
return false;
"""
KERNEL_COMMAND = "make lab"
WIDGET_NUMBER = "return [...document.querySelectorAll('.alpaca-nb-static')].indexOf(arguments[0].closest('.alpaca-nb-static'))"


def describe(control) -> str:
    """Return how a problem names a control: its kind and the text around it."""
    label = control.get_attribute("aria-label") or control.find_element("xpath", "./..").text.strip()[:60]
    return f"<{control.tag_name}{' type=' + control.get_attribute('type') if control.get_attribute('type') else ''}> {label!r}"


def use_widgets(driver, page: Path, views: int) -> tuple[int, list[str]]:
    """Open ``page`` in ``driver`` and use every widget control as a reader would; return the number of widgets that
    acted without a kernel and the problems: an inert control that does not say so, a kernel notice without the
    command, a control of an acting widget that changed nothing (each tried on a freshly loaded page)."""
    controls = load(driver, page, views)
    problems, acting_controls = [], []
    for index, control in enumerate(controls):
        kind, notice, disabled = driver.execute_script(CLASSIFY, control)
        if kind == "kernel" and (KERNEL_COMMAND not in notice or not disabled):
            problems.append(f"a control of a widget that needs a kernel does not say so with `{KERNEL_COMMAND}` or "
                            f"still looks usable: {describe(control)}")
        elif kind == "static":
            acting_controls.append(index)
        elif kind == "inert":
            problems.append(f"a control does nothing in the static page and does not say it needs a kernel "
                            f"({KERNEL_COMMAND}): {describe(control)}")
    idle = set()
    for index in acting_controls:
        control = load(driver, page, views)[index]
        if not driver.execute_script(USE, control):
            problems.append(f"a control changed nothing in the static page: {describe(control)}")
            idle.add(driver.execute_script(WIDGET_NUMBER, control))
    widgets = len(driver.find_elements("css selector", ".widget-subarea .alpaca-nb-static"))
    return widgets - len(idle), problems


def load(driver, page: Path, views: int, timeout_s: float = 30) -> list:
    """Load ``page`` afresh, wait for its widget views to render, and return their controls."""
    driver.get(page.resolve().as_uri())
    deadline = time.monotonic() + timeout_s
    while len(driver.find_elements("css selector", ".widget-subarea > *:not(script)")) < views and time.monotonic() < deadline:
        time.sleep(0.25)
    return driver.find_elements("css selector", f".widget-subarea :is({CONTROLS})")


def check_expectations(report: PageReport, expected: dict[str, int]) -> None:
    """Add a problem to ``report`` for each expected count it falls short of."""
    found = {"images": report.images, "widgets": report.widget_views, "static": report.static_widgets}
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


def print_report(report: PageReport, screenshot: Path) -> bool:
    """Print the page's line and its problems; return True when it failed."""
    status = "FAIL" if report.problems else "ok"
    print(f"{status:4s} {report.page.removesuffix('.html'):24s} images={report.images} widgets={report.widget_views} "
          f"rendered={report.rendered_widgets} acting-without-kernel={report.static_widgets} screenshot={screenshot}")
    for problem in report.problems:
        print(f"     - {problem}")
    return bool(report.problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", type=Path)
    parser.add_argument("--screenshots", type=Path, required=True)
    parser.add_argument("--expect", action="append", default=[], help="PAGE=images:N,widgets:M,static:K")
    args = parser.parse_args(argv)
    expectations = parse_expectations(args.expect)
    pages = sorted((args.html_dir / "book").glob("*.html"))
    if not pages:
        sys.exit(f"check_built_book: no chapter pages in {args.html_dir / 'book'}")
    args.screenshots.mkdir(parents=True, exist_ok=True)
    browser, failed = chromium(), False
    driver = headless_chromium()
    try:
        for page in pages:
            screenshot = args.screenshots / f"{page.stem}.png"
            report = inspect_page(page, page.read_text(encoding="utf-8"), render(browser, page, screenshot))
            report.static_widgets, problems = use_widgets(driver, page, report.widget_views)
            report.problems += problems
            check_expectations(report, expectations.pop(page.stem, {}))
            failed |= print_report(report, screenshot)
    finally:
        driver.quit()
    for missing in expectations:
        print(f"FAIL {missing}: expected page not built")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
