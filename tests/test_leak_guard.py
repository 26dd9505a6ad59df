"""tests/leak_guard.py: a pytest session fails, naming them, when processes its tests started outlive it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

TESTS = Path(__file__).resolve().parent

LEAKING_TESTS = '''
import subprocess

def test_leaks_a_child():
    subprocess.Popen(["sleep", "600"])

def test_leaks_an_orphan():
    subprocess.run(["sh", "-c", "sleep 601 &"], check=True)  # its parent exits: re-parented, not to pytest
'''

CLEAN_TESTS = '''
import subprocess

def test_waits_for_its_child():
    subprocess.run(["sleep", "0.1"], check=True)
'''


def run_session(folder: Path, tests: str) -> subprocess.CompletedProcess:
    """Run pytest with only the leak guard on ``tests`` in ``folder`` (not this project's conftest)."""
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "test_session.py").write_text(tests)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "leak_guard", "-p", "no:cacheprovider", "-q",
                           "--rootdir", str(folder), str(folder / "test_session.py")],
                          cwd=folder, env=environment, capture_output=True, text=True, timeout=120)


def sleeps(seconds: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", seconds]]


def test_a_session_whose_tests_leak_processes_fails_and_names_them(tmp_path):
    result = run_session(tmp_path, LEAKING_TESTS)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    assert "2 process(es) started by the tests outlived them" in result.stdout
    assert ": sleep 600" in result.stdout and ": sleep 601" in result.stdout, result.stdout
    assert sleeps("600") == [] and sleeps("601") == []  # and the guard stopped them


def test_a_session_that_leaves_nothing_running_passes(tmp_path):
    result = run_session(tmp_path, CLEAN_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "outlived" not in result.stdout
