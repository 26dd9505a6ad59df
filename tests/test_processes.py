"""alpaca_nb.processes: children that end with what started them (the servers' and the demo's life cycle)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from alpaca_nb.processes import EXIT_STATUS_SIGTERM, Terminated, sigterm_raises, start_in_own_session, stop_process_tree


def test_sigterm_inside_the_block_raises_terminated_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as stopped:
        with sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; this is never reached in full
    assert stopped.value.code == EXIT_STATUS_SIGTERM == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_stopping_a_tree_ends_descendants_that_started_sessions_of_their_own():
    """As Jupyter kernels do under Voila: a signal to the leader's process group does not reach them."""
    leader = start_in_own_session(["sh", "-c", "setsid sleep 603 & wait"])
    deadline = time.monotonic() + 10
    while not (descendants := psutil.Process(leader.pid).children(recursive=True)) and time.monotonic() < deadline:
        time.sleep(0.05)
    [sleeper] = descendants
    assert os.getsid(sleeper.pid) == sleeper.pid != os.getsid(leader.pid) == leader.pid
    stop_process_tree(leader, grace_s=5)
    assert leader.returncode is not None
    assert not sleeper.is_running()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_child_in_its_own_session_gets_sigterm_when_its_parent_is_killed():
    """The parent is SIGKILLed, so no cleanup of its own runs: only the parent-death signal ends the child."""
    code = ("import sys; from alpaca_nb.processes import start_in_own_session\n"
            "child = start_in_own_session(['sleep', '604'])\n"
            "print(child.pid, flush=True); sys.stdin.read()")
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    deadline = time.monotonic() + 10
    while child.cmdline()[0] != "sleep" and time.monotonic() < deadline:  # until the wrapper has exec'd the command
        time.sleep(0.05)
    assert child.cmdline() == ["sleep", "604"] and child.ppid() == parent.pid
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs([child], timeout=5)
    for survivor in alive:
        survivor.kill()
    assert not alive, "the child outlived its SIGKILLed parent"
