"""Headless Chromium through Selenium and the system chromedriver (never a browser download), for the served
demo's browser test and its load test in benchmarks/."""

from __future__ import annotations

import shutil
import socket

INSTALL_HINT = "apt-get install chromium chromium-driver (make test installs them when it may)"


def browser_paths() -> tuple[str, str]:
    """Return the system's Chromium and chromedriver; raise RuntimeError naming the packages when either is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        raise RuntimeError(f"the served demo's browser tests need Chromium and its driver: {INSTALL_HINT}")
    return chromium, driver


def headless_chromium(width: int = 1280, height: int = 1600):
    """Return a new headless Chromium session (call ``quit()`` on it)."""
    from selenium import webdriver

    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
