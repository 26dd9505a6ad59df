"""Load test of the served demo in real browsers: 1, 8 and 16 headless Chromium visitors ask at once.

Starts `alpaca-nb demo` (the embedded model unless --model is given), opens every visitor's page first, then
has them all press Generate at the same moment, each with its own instruction, and waits until every answer
is in that visitor's history. It prints, per number of visitors: peak resident memory of the whole demo (the
served process and everything it started, sampled every 0.25 s, resident (RSS) and
proportional (PSS: pages shared by several processes split among them); the browsers are not counted), time to the
first streamed text and to the full answer (median and max, from the click), the deepest queue position a
page showed, and errors (an answer missing, another visitor's answer on a page, a refusal). The browsers run
at the lowest CPU priority, standing in for the students' own machines. Ratios compare
each row's times with the single visitor's, measured in the same run; the goal on a 2-core laptop is every
visitor answered, peak memory under 1.5 GB and no error at 16 visitors.

    .venv/bin/python benchmarks/bench_demo_load.py                 # 1, 8, 16 visitors (about 10 min here)
    .venv/bin/python benchmarks/bench_demo_load.py --visitors 1 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import free_port, headless_chromium  # noqa: E402  (the tests' browser helpers)

INSTRUCTIONS = (
    "Name three primary colours.", "Give three tips for staying healthy.", "What is the capital of France?",
    "Describe a cat in one sentence.", "List four kinds of fruit.", "Explain what a verb is.",
    "Suggest a name for a pet fish.", "Write a haiku about rain.", "What does a thermometer measure?",
    "Give two uses for a paperclip.", "Why is the sky blue?", "Name a famous painter.",
    "How many days are in a week?", "Describe the taste of lemon.", "What is photosynthesis?",
    "Suggest a healthy breakfast.",
)
MEMORY_GOAL_BYTES = 1.5e9


@dataclass
class Visit:
    first_text_s: float | None = None
    answered_s: float | None = None
    deepest_queue: int = 0
    error: str | None = None


class DemoPage:
    """The served page, as a visitor's browser sees it (the selectors are demo_server's elem_classes)."""

    def __init__(self, browser, url: str):
        self.browser = browser
        browser.get(url)
        self._wait(lambda: self._find(".alpaca-nb-demo-instruction textarea"), 120, "the page to load")

    def ask(self, instruction: str) -> None:
        box = self._find(".alpaca-nb-demo-instruction textarea")[0]
        box.send_keys(instruction)
        self._find("button.alpaca-nb-demo-generate")[0].click()

    def text(self, part: str) -> str:
        return " ".join(e.text for e in self._find(f".prose.alpaca-nb-demo-{part}")).strip()  # not its block

    def refusal(self) -> str | None:
        """Return the status line when it says the request was refused (anything but progress), else None."""
        status = self.text("status")
        return status if status and "answering" not in status else None

    def queue_position(self) -> int:
        match = re.search(r"queue:\s*(\d+)\s*/", self.browser.find_element("tag name", "body").text)
        return int(match.group(1)) if match else 0

    def _find(self, css: str):
        return self.browser.find_elements("css selector", css)

    @staticmethod
    def _wait(condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)


def visit(page: DemoPage, instruction: str, start: threading.Barrier, timeout: float) -> Visit:
    result = Visit()
    start.wait()
    clicked = time.monotonic()
    try:
        page.ask(instruction)
        while time.monotonic() - clicked < timeout:
            result.deepest_queue = max(result.deepest_queue, page.queue_position())
            if result.first_text_s is None and page.text("reply"):
                result.first_text_s = time.monotonic() - clicked
            history = page.text("history")
            if "Model:" in history:
                result.answered_s = time.monotonic() - clicked
                if instruction not in history:
                    result.error = f"another visitor's exchange on the page: {history[:120]!r}"
                elif result.first_text_s is None:  # the whole answer came in one update
                    result.first_text_s = result.answered_s
                return result
            refusal = page.refusal()
            if refusal:
                result.error = f"refused: {refusal}"
                return result
            time.sleep(0.1)
        result.error = f"no answer within {timeout:.0f} s"
    except Exception as error:  # noqa: BLE001 - a broken page is a counted error, not the end of the run
        result.error = f"{type(error).__name__}: {error}"
    return result


class PeakMemory:
    """The peak of the summed resident memory of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int):
        self.root, self.peak, self.peak_pss, self._stop = psutil.Process(pid), 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            rss = pss = 0
            for each in [self.root, *self.root.children(recursive=True)]:
                try:
                    memory = each.memory_full_info()
                except psutil.NoSuchProcess:
                    continue
                rss, pss = rss + memory.rss, pss + memory.pss
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)


def start_demo(args: argparse.Namespace, folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "alpaca_nb.cli", "demo", "--port", str(port), "--flags", str(folder / "flags.jsonl"),
               "--per-minute", "1000", "--concurrency", str(args.concurrency), "--max-tokens", str(args.max_tokens), *(["--model", args.model] if args.model else [])]
    log = open(folder / "demo.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 300
    while True:
        if process.poll() is not None:
            sys.exit(f"alpaca-nb demo exited with {process.returncode}: {(folder / 'demo.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return process, url
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                sys.exit("alpaca-nb demo did not answer within 300 s")
            time.sleep(1)


def lowest_priority(browser) -> None:
    """Renice a browser and all its processes to 19: a class's browsers run on the students' machines, not on
    the demo's cores, and 16 pages' progress timers would otherwise take a core from the model here."""
    root = psutil.Process(browser.service.process.pid)
    for each in [root, *root.children(recursive=True)]:
        try:
            each.nice(19)
        except psutil.NoSuchProcess:
            pass


def run_round(url: str, visitors: int, timeout: float, memory: PeakMemory) -> list[Visit]:
    browsers = [headless_chromium() for _ in range(visitors)]
    for browser in browsers:
        lowest_priority(browser)  # before any page opens: the renderers it starts inherit the priority
    try:
        pages = [DemoPage(browser, url) for browser in browsers]
        for browser in browsers:
            lowest_priority(browser)  # again: Chromium starts the pages' renderers at normal priority
        memory.peak = memory.peak_pss = 0
        start = threading.Barrier(visitors)
        results: list[Visit | None] = [None] * visitors

        def one(i: int) -> None:
            results[i] = visit(pages[i], INSTRUCTIONS[i % len(INSTRUCTIONS)], start, timeout)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(visitors)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [r for r in results if r is not None]
    finally:
        for browser in browsers:
            browser.quit()


def summary(times: list[float]) -> tuple[float, float]:
    return (statistics.median(times), max(times)) if times else (float("nan"), float("nan"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visitors", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="the demo's --max-tokens: the longest answer, and the page's default")
    parser.add_argument("--concurrency", type=int, default=4, help="the demo's --concurrency")
    parser.add_argument("--model", default=None, help="the demo's --model (default: the embedded model)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a visitor waits for the answer")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    process, url = start_demo(args, folder)
    rows, baseline = [], None
    try:
        with PeakMemory(process.pid) as memory:
            for visitors in args.visitors:
                results = run_round(url, visitors, args.timeout, memory)
                first = summary([r.first_text_s for r in results if r.first_text_s is not None])
                full = summary([r.answered_s for r in results if r.answered_s is not None])
                errors = [r.error for r in results if r.error]
                baseline = baseline or full[0]
                rows.append((visitors, memory.peak / 1e9, memory.peak_pss / 1e9, *first, *full, full[0] / baseline,
                             max(r.deepest_queue for r in results), len(errors)))
                print(f"{visitors} visitors: done, {len(errors)} errors {errors[:3]}", file=sys.stderr, flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    print(f"served demo under load ({args.max_tokens}-token answers, --concurrency {args.concurrency}, "
          f"{psutil.cpu_count()} CPUs; demo log {folder / 'demo.log'})")
    print("visitors | peak RSS GB | peak PSS GB | first text s (median, max) | full answer s (median, max) | "
          "median full vs 1 visitor | deepest queue shown | errors")
    for visitors, peak, pss, f_med, f_max, a_med, a_max, ratio, queue, errors in rows:
        print(f"{visitors:8d} | {peak:11.2f} | {pss:11.2f} | {f_med:10.1f} {f_max:6.1f} | {a_med:10.1f} {a_max:6.1f} | "
              f"{ratio:23.1f}x | {queue:19d} | {errors}")
    worst = rows[-1]
    met = worst[1] * 1e9 < MEMORY_GOAL_BYTES and worst[-1] == 0
    print(f"goal at {worst[0]} visitors (all answered, no error, peak memory under 1.5 GB): {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
