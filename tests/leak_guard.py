"""A pytest plugin that fails the session when a process it started outlives it, naming each one.

Written after a fresh clone's `make test` left a Voila server and two kernels (1.6 GB) running for hours.
On Linux the pytest process becomes a child subreaper, so that a process orphaned by a test (its parent
killed, as `alpaca-nb demo` was) is re-parented to pytest rather than to init and is still found here.
The check runs after every fixture is torn down (browsers, session-scoped servers); what it finds is reported,
then stopped, so that the next run starts clean.
"""

from __future__ import annotations

import ctypes
import sys

import psutil
import pytest

PR_SET_CHILD_SUBREAPER = 36
# A process being torn down by a fixture may take a moment to go; only those still there after this are leaks.
GRACE_S = 5.0


def pytest_configure(config: pytest.Config) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@pytest.hookimpl(trylast=True)  # after _pytest.runner's, which finalizes the session's fixtures
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaked = surviving_descendants(GRACE_S)
    if not leaked:
        return
    lines = [f"pid {each.pid}: {describe(each)}" for each in leaked]
    report(session.config, f"{len(leaked)} process(es) started by the tests outlived them", lines)
    stop(leaked)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Helpers that Python itself starts for the life of the interpreter and that end with it, since they read a
# pipe from it: multiprocessing's resource tracker (a spawn Pool starts one) and forkserver.
ENDS_WITH_PYTEST = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def surviving_descendants(grace_s: float) -> list[psutil.Process]:
    """Return this process's live descendants (zombies and ENDS_WITH_PYTEST excluded) still running after ``grace_s``."""
    living = [each for each in psutil.Process().children(recursive=True)
              if not is_zombie(each) and not any(helper in describe(each) for helper in ENDS_WITH_PYTEST)]
    _, alive = psutil.wait_procs(living, timeout=grace_s)
    return [each for each in alive if not is_zombie(each)]


def is_zombie(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def describe(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()) or process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "(gone or unreadable)"


def report(config: pytest.Config, title: str, lines: list[str]) -> None:
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if terminal is None:
        print("\n".join([title, *lines]), file=sys.stderr)
        return
    terminal.write_sep("=", title, red=True, bold=True)
    for line in lines:
        terminal.write_line(line, red=True)
    terminal.write_line("(stopped now; the session fails)", red=True)


def stop(processes: list[psutil.Process]) -> None:
    for each in processes:
        try:
            each.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=5)
    for each in alive:
        try:
            each.kill()
        except psutil.NoSuchProcess:
            pass
