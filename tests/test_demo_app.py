"""The served demo: `alpaca-nb demo` (Voila) in headless Chromium, driven by Selenium and the system chromedriver.

Loads the page, types an instruction, presses Generate and watches the answer stream in, then sends a prompt
that the offline content filter blocks, and flags that exchange. Real end to end: the embedded model answers in Voila's kernel.
Screenshots go to _build/screenshots/ (demo-answer.png, demo-blocked.png).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

from alpaca_nb.safety import load_labelled_prompts, moderate

SCREENSHOTS = Path(__file__).resolve().parents[1] / "_build" / "screenshots"
START_TIMEOUT_S = 240  # Voila starts a kernel that loads the embedded model


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the served demo's browser test needs Chromium and its driver: "
                    "apt-get install chromium chromium-driver (make test installs them when it may)")
    return chromium, driver


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServedDemo(NamedTuple):
    url: str
    flags: Path
    log: Path
    process: subprocess.Popen  # `alpaca-nb demo`; Voila is its child


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Yield the `alpaca-nb demo` serving the embedded model; stop it afterwards (a test may have already)."""
    folder = tmp_path_factory.mktemp("demo")
    port, log = free_port(), folder / "voila.log"
    command = [sys.executable, "-m", "alpaca_nb.cli", "demo", "--port", str(port), "--flags", str(folder / "flags.jsonl")]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"alpaca-nb demo exited with {process.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"alpaca-nb demo did not answer within {START_TIMEOUT_S} s:\n{log.read_text()}")
            time.sleep(1)
    yield ServedDemo(url, folder / "flags.jsonl", log, process)
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield session
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


def ask(browser, instruction: str) -> None:
    from selenium.webdriver.common.by import By

    from selenium.webdriver.common.keys import Keys

    box = browser.find_elements(By.CSS_SELECTOR, ".widget-textarea textarea")[0]
    box.send_keys(Keys.CONTROL, "a")  # typed, not box.clear(): the widget syncs on the keyboard's input events
    box.send_keys(Keys.DELETE)
    box.send_keys(instruction)
    generate = next(b for b in browser.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == "Generate")
    wait_for(generate.is_enabled, 300, "the Generate button to be enabled again")
    generate.click()


def text_of(browser, part: str) -> str:
    """Return the visible text of the demo's ``part`` (status, reply or history; see widgets.chat_demo_widget)."""
    from selenium.webdriver.common.by import By

    return "".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, f".alpaca-nb-demo-{part}")).strip()


def test_the_served_demo_streams_an_answer_and_blocks_a_harmful_prompt(served, browser):
    from selenium.webdriver.common.by import By

    url, flags, log, _ = served
    browser.get(url)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".widget-textarea textarea"), START_TIMEOUT_S,
             f"the demo's widgets to render (Voila log: {log})", poll=1)
    assert "Terms of use" in browser.find_element(By.TAG_NAME, "body").text

    ask(browser, "Name three primary colours.")
    seen: list[str] = []

    def answered() -> bool:  # records each state of the streamed reply until the history shows the exchange
        reply = text_of(browser, "reply")
        if reply and (not seen or seen[-1] != reply):
            seen.append(reply)
        return "Model:" in text_of(browser, "history")

    wait_for(answered, 300, "the answer to appear in the history")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / "demo-answer.png"))
    assert len(seen) >= 2, f"the reply did not stream: states seen {seen}"
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:])), seen
    assert seen[-1] in text_of(browser, "history")

    history_before = text_of(browser, "history")
    harmful = next(p.text for p in load_labelled_prompts("development") if p.harmful and moderate(p.text).flagged)
    ask(browser, harmful)
    wait_for(lambda: text_of(browser, "history") != history_before, 300, "the second exchange")
    browser.save_screenshot(str(SCREENSHOTS / "demo-blocked.png"))
    newest = text_of(browser, "history").removesuffix(history_before)
    assert harmful in newest and "the content filter flagged the instruction" in newest, newest

    reason = browser.find_element(By.CSS_SELECTOR, ".widget-text input")
    reason.send_keys("a test flag: the filter's verdict is shown as it should be")
    next(b for b in browser.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == "Flag this answer").click()
    wait_for(lambda: "Flagged" in text_of(browser, "status"), 30, "the flag to be saved")
    [record] = [json.loads(line) for line in flags.read_text().splitlines()]
    assert record["instruction"] == harmful and record["blocked"] == "instruction" and record["reason"].startswith("a test")


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {process.pid} (gone)"


def test_stopping_the_demo_ends_voila_and_all_its_kernels(served):
    """What a test teardown or a SLURM time limit does; once it left Voila and two kernels (1.6 GB) running for
    hours. Kernels start sessions of their own, so stopping Voila's process group alone would miss them."""
    with urllib.request.urlopen(served.url, timeout=START_TIMEOUT_S) as page:  # Voila runs the app in a kernel
        page.read()
    tree = psutil.Process(served.process.pid).children(recursive=True)
    assert any("voila" in command_line(each) for each in tree), [command_line(each) for each in tree]
    assert any("ipykernel" in command_line(each) for each in tree), [command_line(each) for each in tree]
    served.process.terminate()
    status = served.process.wait(timeout=60)
    _, alive = psutil.wait_procs(tree, timeout=10)
    survivors = [command_line(each) for each in alive]
    for each in alive:
        each.kill()
    assert survivors == [], f"still running after alpaca-nb demo was terminated: {survivors}"
    assert status == 143, served.log.read_text()[-2000:]  # 128 + SIGTERM, after an orderly stop
