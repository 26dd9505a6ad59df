"""`make lab` / `alpaca-nb lab`: the chapters run live. The command is started as a reader starts it (its kernels at
smoke size); headless Chromium opens chapter 3, runs its cells and moves the cost calculator's slider, then opens
chapter 2 and edits the generation prompt, and the kernel prices the edit. Screenshots go to _build/screenshots/lab/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from alpaca_nb.cli import RECIPE_STAGES
from alpaca_nb.lab import DEFAULT_VIEWERS, book_dir, lab_command, open_chapters_as_notebooks
from alpaca_nb.processes import stop_process_tree
from alpaca_nb.reproduce import STAGES
from browser import free_port, headless_chromium

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "_build" / "screenshots" / "lab"
TOKEN = "alpaca-nb-lab-test"


def test_the_cli_offers_the_recipes_stages():
    assert RECIPE_STAGES == STAGES


def test_chapters_open_as_notebooks_by_a_settings_file_of_our_own(tmp_path):
    path = open_chapters_as_notebooks(tmp_path)
    assert path == tmp_path / "share/jupyter/lab/settings/overrides.d/alpaca-nb.json"
    assert json.loads(path.read_text()) == DEFAULT_VIEWERS
    command = lab_command(book_dir(), port=8899, open_browser=False, token="t")
    assert command[:3] == [sys.executable, "-m", "jupyterlab"] and f"--ServerApp.root_dir={ROOT / 'book'}" in command
    assert "--ServerApp.open_browser=False" in command and "--IdentityProvider.token=t" in command


def test_reset_refuses_a_folder_that_is_not_a_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPACA_NB_CACHE_DIR", str(tmp_path))
    from alpaca_nb.profiles import current_profile
    from alpaca_nb.reproduce import recipe_dir

    mine = recipe_dir(current_profile()) / "fine_tune"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "alpaca_nb.cli", "lab", "--reset", "fine_tune", "--no-browser"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not a stage folder" in result.stderr and (mine / "notes.txt").is_file()


def test_reset_deletes_a_stage_folder_so_the_chapters_run_it_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPACA_NB_CACHE_DIR", str(tmp_path))
    from alpaca_nb.lab import reset_stages
    from alpaca_nb.profiles import current_profile
    from alpaca_nb.reproduce import STARTED, recipe_dir

    stage = recipe_dir(current_profile()) / "evaluate"
    stage.mkdir(parents=True)
    (stage / STARTED).write_text("{}")
    assert reset_stages(current_profile(), ["evaluate", "watermark"]) == [stage] and not stage.exists()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Start `alpaca-nb lab --smoke --no-browser` as a reader would, on a copy of book/ (saving a chapter writes it)
    and with Jupyter's own state in a temporary folder; stop it with SIGTERM (JupyterLab then shuts its kernels down)."""
    home = tmp_path_factory.mktemp("jupyter")
    book = shutil.copytree(ROOT / "book", home / "book")
    settings = home / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # Every cell in the page, so that the browser finds the widgets of the last ones (JupyterLab may window cells).
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port = free_port()
    env = {**os.environ, "JUPYTER_TOKEN": TOKEN, "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    log = (home / "lab.log").open("w")
    process = subprocess.Popen([str(Path(sys.executable).with_name("alpaca-nb")), "lab", "--smoke", "--no-browser",
                                "--port", str(port), "--book", str(book)], env=env, stdout=log, stderr=subprocess.STDOUT)
    started = time.monotonic()
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/api/status?token={TOKEN}", process, home / "lab.log")
        print(f"JupyterLab answered {time.monotonic() - started:.1f} s after `alpaca-nb lab`")
        browser = headless_chromium(1400, 2000)
        try:
            yield browser, f"http://127.0.0.1:{port}", book
        finally:
            browser.quit()
    finally:
        process.terminate()
        assert process.wait(timeout=60) is not None
        stop_process_tree(process)
        log.close()


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"alpaca-nb lab exited {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer in {timeout_s:.0f} s: {log.read_text()[-2000:]}")


def open_chapter(browser, base: str, chapter: str) -> None:
    """Open ``chapter`` by URL, as a double-click does: the markdown file opens as a notebook; wait for its kernel."""
    browser.get(f"{base}/lab/tree/{chapter}?token={TOKEN}")
    wait_for(browser, lambda: showing(browser, chapter), 90, f"{chapter} did not open as a notebook")
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']")
             or kernel_idle(browser), 90, "the kernel did not start")


def showing(browser, chapter: str) -> bool:
    """Return True once the tab in view is ``chapter`` opened as a notebook, its code cells drawn."""
    tabs = browser.find_elements(By.CSS_SELECTOR, ".jp-mod-current .lm-TabBar-tabLabel, .lm-mod-current .lm-TabBar-tabLabel")
    panels = [panel for panel in browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel") if panel.is_displayed()]
    return (any(tab.text == chapter for tab in tabs) and bool(panels)
            and any(cell.text.strip() for cell in panels[0].find_elements(By.CSS_SELECTOR, ".jp-CodeCell")))


def kernel_idle(browser) -> bool:
    return any("Idle" in element.text for element in browser.find_elements(By.CSS_SELECTOR, ".jp-StatusBar-TextItem"))


def wait_for(browser, condition, timeout_s: float, message: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.5)
    browser.save_screenshot(str(SCREENSHOTS / "failure.png"))
    pytest.fail(f"{message} within {timeout_s:.0f} s (screenshot: {SCREENSHOTS / 'failure.png'})")


def menu(browser, menu_name: str, command: str) -> None:
    """Choose a command from JupyterLab's menu bar, as a reader clicks it."""
    bar = next(item for item in browser.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel") if item.text == menu_name)
    bar.click()
    browser.find_element(By.CSS_SELECTOR, f".lm-Menu-item[data-command='{command}']").click()


def notebook(browser):
    """Return the notebook in view (the other open tabs stay in the page, hidden)."""
    return next(panel for panel in browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel") if panel.is_displayed())


def ran(cells) -> bool:
    prompts = [cell.find_element(By.CSS_SELECTOR, ".jp-InputPrompt").text for cell in cells]
    return all(prompt.startswith("[") and "*" not in prompt and prompt != "[ ]:" for prompt in prompts)


def cells_done(browser) -> bool:
    cells = notebook(browser).find_elements(By.CSS_SELECTOR, ".jp-CodeCell")
    return bool(cells) and ran(cells)


def no_errors(browser) -> list[str]:
    return [output.text[:300] for output in notebook(browser).find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")
            if "Traceback" in output.text or "Error" in output.text.split("\n", 1)[0]]


def test_chapter_3_runs_live_and_its_cost_slider_moves_the_price(lab):
    browser, base, book = lab
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    open_chapter(browser, base, "03_costs.md")
    menu(browser, "Run", "runmenu:run-all")
    wait_for(browser, lambda: cells_done(browser), 600, "chapter 3's cells did not all run")
    assert no_errors(browser) == []
    widget = wait_for(browser, lambda: notebook(browser).find_elements(By.CSS_SELECTOR, ".alpaca-nb-static"), 30,
                      "the cost calculator did not render")[0]
    output = widget.find_element(By.CSS_SELECTOR, ".alpaca-nb-output")
    before = output.text
    keep_rate = widget.find_element(By.CSS_SELECTOR, "input[type=range]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", keep_rate)
    ActionChains(browser).click(keep_rate).send_keys(Keys.END).perform()  # a reader drags it to keep everything
    wait_for(browser, lambda: output.text != before, 10, "moving the slider did not change the price")
    requests_before, requests_after = (float(text.split(" requests")[0].split()[-1].replace(",", ""))
                                       for text in (before, output.text))
    assert keep_rate.get_attribute("value") == "1" and requests_after == pytest.approx(requests_before / 2, rel=1e-3)
    browser.save_screenshot(str(SCREENSHOTS / "03_costs.png"))
    assert saved_unchanged(browser, book / "03_costs.md")


def test_chapter_2_prompt_edited_live_gets_a_new_price_from_the_kernel(lab):
    browser, base, book = lab
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    open_chapter(browser, base, "02_self_instruct.md")
    editor = None
    cells = notebook(browser).find_elements(By.CSS_SELECTOR, ".jp-CodeCell")
    for position, cell in enumerate(cells):
        if "prompt_price_widget(tasks" in cell.text:
            cell.find_element(By.CSS_SELECTOR, ".jp-InputPrompt").click()
            menu(browser, "Run", "notebook:run-all-above")
            wait_for(browser, lambda: ran(cells[:position]), 120, "the cells above the widget did not run")
            cell.find_element(By.CSS_SELECTOR, ".jp-InputPrompt").click()
            menu(browser, "Run", "notebook:run-cell")
            editor = wait_for(browser, lambda: cell.find_elements(By.CSS_SELECTOR, ".alpaca-nb-static textarea:not([readonly])"),
                              60, "the prompt editor did not open (no answer from the kernel)")[0]
            break
    assert editor is not None, "chapter 2 has no prompt_price_widget cell"
    output = cell.find_element(By.CSS_SELECTOR, ".alpaca-nb-output")
    picked_tokens = int(output.get_attribute("data-tokens"))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", editor)
    editor.click()
    editor.send_keys(Keys.CONTROL, Keys.END)
    editor.send_keys(" Write every instruction in French, and make each one about cooking.")
    edited = wait_for(browser, lambda: cell.find_element(By.CSS_SELECTOR, ".alpaca-nb-edited").text, 30,
                      "the edited prompt got no price")
    tokens = int(edited.split("your edited prompt: ")[1].split(" prompt tokens")[0])
    assert tokens > picked_tokens and "worst case $" in edited
    browser.save_screenshot(str(SCREENSHOTS / "02_self_instruct.png"))
    assert saved_unchanged(browser, book / "02_self_instruct.md")



def saved_unchanged(browser, chapter: Path) -> bool:
    """Save the chapter in view (File > Save, jupytext writes the .md) and return True when the file is byte for byte
    the repository's: running a chapter and using its widgets changes nothing a reader did not edit (book/jupytext.toml)."""
    before = chapter.stat().st_mtime_ns
    menu(browser, "File", "docmanager:save")
    wait_for(browser, lambda: chapter.stat().st_mtime_ns != before, 30, f"{chapter.name} was not saved")
    return chapter.read_text(encoding="utf-8") == (ROOT / "book" / chapter.name).read_text(encoding="utf-8")
