"""The served demo: `alpaca-nb demo` (Gradio: one process, the model loaded once, many visitors) in headless
Chromium, driven by Selenium and the system chromedriver.

Three visitors ask at once and each page streams its own answer from the embedded model; a harmful prompt is
blocked and flagged; the content filter holds back a flagged sentence before it reaches any page (a model
stand-in emits it mid-stream); an address off this machine asks for the password the command prints; SIGTERM
ends the demo with everything it started. Screenshots go to _build/screenshots/ (demo-answer.png,
demo-blocked.png). The load test at 1, 8 and 16 visitors is benchmarks/bench_demo_load.py.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

from alpaca_nb.safety import load_labelled_prompts, moderate
from browser import free_port, headless_chromium

SCREENSHOTS = Path(__file__).resolve().parents[1] / "_build" / "screenshots"
START_TIMEOUT_S = 240  # the demo loads the embedded model before it serves
ANSWER_TIMEOUT_S = 300
INSTRUCTIONS = ("Name three primary colours.", "Give two uses for a paperclip.", "What does a thermometer measure?")


class Served(NamedTuple):
    url: str
    flags: Path
    log: Path
    process: subprocess.Popen


def start_demo(folder: Path, *options: str) -> Served:
    """Start `alpaca-nb demo` with ``options`` and return once its page answers (fail with its log if not)."""
    port, log = free_port(), folder / "demo.log"
    command = [sys.executable, "-m", "alpaca_nb.cli", "demo", "--port", str(port), "--flags", str(folder / "flags.jsonl"),
               *options]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"alpaca-nb demo exited with {process.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return Served(url, folder / "flags.jsonl", log, process)
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"alpaca-nb demo did not answer within {START_TIMEOUT_S} s:\n{log.read_text()}")
            time.sleep(1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Yield `alpaca-nb demo` serving the embedded model; stop it afterwards (a test may have already)."""
    # Two answers at a time: three visitors asking at once share the model, and one of them waits in the queue.
    demo = start_demo(tmp_path_factory.mktemp("demo"), "--per-minute", "100", "--concurrency", "2")
    yield demo
    demo.process.terminate()
    demo.process.wait(timeout=60)


@pytest.fixture(scope="module")
def browsers():
    sessions = []
    try:
        for _ in INSTRUCTIONS:
            sessions.append(headless_chromium())
    except RuntimeError as error:  # no Chromium: say how to install it
        pytest.fail(str(error))
    yield sessions
    for session in sessions:
        session.quit()


def wait_for(condition, timeout: float, what: str, poll: float = 0.1):
    """Return condition()'s first truthy value, polling; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def find(browser, css: str):
    return browser.find_elements("css selector", css)


def open_page(browser, url: str) -> None:
    browser.get(url)
    wait_for(lambda: find(browser, ".alpaca-nb-demo-instruction textarea"), 60, "the demo's page to render", poll=0.5)


def ask(browser, instruction: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = find(browser, ".alpaca-nb-demo-instruction textarea")[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(instruction)
    find(browser, "button.alpaca-nb-demo-generate")[0].click()


def text_of(browser, part: str) -> str:
    """Return the visible text of the demo's ``part`` (status, reply or history; see demo_server.build_app)."""
    return " ".join(e.text for e in find(browser, f".prose.alpaca-nb-demo-{part}")).strip()  # not its block


def test_three_visitors_at_once_each_get_their_own_streamed_answer(served, browsers):
    for browser in browsers:
        open_page(browser, served.url)
    assert "Terms of use" in browsers[0].find_element("tag name", "body").text
    assert "carry a watermark" in browsers[0].find_element("tag name", "body").text
    seen: list[list[str]] = [[] for _ in browsers]
    queued = [False for _ in browsers]

    def answered(i: int) -> bool:  # records each state of the streamed reply until the history shows the exchange
        reply = text_of(browsers[i], "reply")
        if reply and (not seen[i] or seen[i][-1] != reply):
            seen[i].append(reply)
        queued[i] = queued[i] or bool(re.search(r"queue: *\d+/\d+", browsers[i].find_element("tag name", "body").text))
        return "Model:" in text_of(browsers[i], "history")

    start = threading.Barrier(len(browsers))

    def visit(i: int) -> None:
        start.wait()
        ask(browsers[i], INSTRUCTIONS[i])

    threads = [threading.Thread(target=visit, args=(i,)) for i in range(len(browsers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: all([answered(i) for i in range(len(browsers))]), ANSWER_TIMEOUT_S, "every visitor's answer")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browsers[0].save_screenshot(str(SCREENSHOTS / "demo-answer.png"))
    for i, browser in enumerate(browsers):
        history = text_of(browser, "history")
        assert INSTRUCTIONS[i] in history and "watermarked" in history, history
        assert not any(other in history for other in INSTRUCTIONS if other != INSTRUCTIONS[i]), history
        assert all(later.startswith(earlier) for earlier, later in zip(seen[i], seen[i][1:])), seen[i]
        assert seen[i] and seen[i][-1] in history
    assert max(len(states) for states in seen) >= 2, f"no reply streamed: states seen {seen}"
    assert any(queued), "no page showed its place in the queue"
    # one process holds the model: no visitor started a process of its own
    assert psutil.Process(served.process.pid).children(recursive=True) == []

    browser = browsers[1]  # any answer the demo gave can be checked for the watermark on the page
    next(e for e in find(browser, "button") if "Check a text for the watermark" in e.text).click()
    suspect = wait_for(lambda: [e for e in find(browser, ".alpaca-nb-demo-suspect textarea") if e.is_displayed()], 30,
                       "the check's box")
    suspect[0].send_keys(seen[1][-1])
    next(e for e in find(browser, "button") if e.text.strip() == "Check").click()
    verdict = wait_for(lambda: text_of(browser, "watermark"), 60, "the watermark verdict")
    assert "tokens scored" in verdict and "z = " in verdict, verdict


def test_a_harmful_prompt_is_blocked_and_can_be_flagged(served, browsers):
    browser = browsers[0]
    open_page(browser, served.url)  # a fresh page: a new visitor
    harmful = next(p.text for p in load_labelled_prompts("development") if p.harmful and moderate(p.text).flagged)
    ask(browser, harmful)
    wait_for(lambda: "Model:" in text_of(browser, "history"), ANSWER_TIMEOUT_S, "the blocked exchange")
    browser.save_screenshot(str(SCREENSHOTS / "demo-blocked.png"))
    history = text_of(browser, "history")
    assert harmful in history and "the content filter flagged the instruction" in history, history

    reason = find(browser, ".alpaca-nb-demo-reason textarea, .alpaca-nb-demo-reason input")[0]
    reason.send_keys("a test flag: the filter's verdict is shown as it should be")
    next(b for b in find(browser, "button") if b.text.strip() == "Flag this answer").click()
    wait_for(lambda: "Flagged" in text_of(browser, "status"), 30, "the flag to be saved")
    [record] = [json.loads(line) for line in served.flags.read_text().splitlines()]
    assert record["instruction"] == harmful and record["blocked"] == "instruction" and record["reason"].startswith("a test")


def test_stopping_the_demo_ends_it_and_everything_it_started(served):
    """What a test teardown or a SLURM time limit does: SIGTERM closes the server and exits 143."""
    tree = psutil.Process(served.process.pid).children(recursive=True)
    served.process.terminate()
    status = served.process.wait(timeout=60)
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == [] and status == 143, served.log.read_text()[-2000:]


def test_no_flagged_text_ever_reaches_the_page_dom(tmp_path):
    """The filter-ordering test: a model stand-in streams a flagged sentence mid-answer, word by word; the page's
    whole DOM, read every 20 ms from the click to the end, never holds it, and the sentences before it do show."""
    from test_demo import MID_STREAM, StandInEndpoint, flags_forbidden

    from alpaca_nb.demo import ChatDemo
    from alpaca_nb.demo_server import serve

    flags_forbidden.asked = []
    endpoint = StandInEndpoint(MID_STREAM, delay_s=0.15)
    port = free_port()
    app = serve(ChatDemo(endpoint=endpoint, check=flags_forbidden, flags_path=tmp_path / "flags.jsonl"),
                "127.0.0.1", port, None)
    browser = headless_chromium()
    try:
        open_page(browser, f"http://127.0.0.1:{port}/")
        ask(browser, "Tell me something.")
        doms: list[str] = []

        def done() -> bool:
            doms.append(browser.page_source)
            return "Model:" in text_of(browser, "history")

        wait_for(done, 120, "the blocked answer", poll=0.02)
        doms.append(browser.page_source)
    finally:
        browser.quit()
        app.close()
    assert not [dom for dom in doms if "FORBIDDEN" in dom]
    assert any("A second line follows it." in dom for dom in doms), "the passed sentences never showed"
    assert "the content filter flagged the reply" in doms[-1] and len(doms) > 20


def http(url: str, data: dict | None = None, cookie: str | None = None) -> tuple[int, str, str | None]:
    """Return the status, body and set-cookie of a GET (or a form POST with ``data``)."""
    request = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode() if data else None,
                                     headers={"Cookie": cookie} if cookie else {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read().decode(), response.headers.get("set-cookie")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), None


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_a_class_address_needs_the_password_the_command_prints(tmp_path):
    """Served on 0.0.0.0 (the class's network), nothing but the sign-in answers without the printed password.
    The demo asks an external server here (never contacted), so no model is loaded."""
    demo = start_demo(tmp_path, "--host", "0.0.0.0", "--base-url", "http://127.0.0.1:9/v1", "--model", "stand-in")
    try:
        log = wait_for(lambda: "password:" in demo.log.read_text() and demo.log.read_text(), 30, "the password line")
        password = log.split("password:")[1].split()[0]
        assert len(password) >= 12 and "no watermark" in log
        assert http(demo.url + "config")[0] == 401
        assert http(demo.url + "gradio_api/info")[0] == 401
        assert http(demo.url + "login", {"username": "anyone", "password": "wrong"})[0] in (400, 401)
        status, _, cookie = http(demo.url + "login", {"username": "anyone", "password": password})
        assert status == 200 and cookie
        status, config, _ = http(demo.url + "config", cookie=cookie.split(";")[0])
        assert status == 200 and "NO watermark" in config
        assert "watermark: not available" in config  # the switch is shown off and says why
        status, info, _ = http(demo.url + "gradio_api/info", cookie=cookie.split(";")[0])
        assert status == 200 and json.loads(info)["named_endpoints"] == {}  # only the page's own handlers
    finally:
        demo.process.send_signal(signal.SIGTERM)
        assert demo.process.wait(timeout=60) == 143
