"""Child processes that end with the command that started them: own sessions, a parent-death signal, SIGTERM.

A SLURM time limit sends SIGTERM to ``alpaca-nb``; ``kill -9`` or a dead notebook kernel sends nothing at all.
Either way the llama.cpp server (:mod:`alpaca_nb.llm`) and any server or kernel started beside it
must not keep running, holding a gigabyte or more, after what started them is gone. So they are

* started as leaders of their own session (:func:`start_in_own_session`): the whole group can be signalled at
  once, and a Ctrl-C at the terminal reaches only ``alpaca-nb``, which then stops them in order;
* on Linux, given a parent-death signal, so they get SIGTERM even when their parent is SIGKILLed;
* stopped as a tree (:func:`stop_process_tree`): SIGTERM, a grace period, SIGKILL for what is left, including
  descendants that started sessions of their own (Jupyter kernels do);

and the long-running commands turn SIGTERM into :class:`Terminated` (:func:`sigterm_raises`), so that ``with``
blocks clean up on the way out and the command exits with status 143, as a shell reports a SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Sequence

import psutil  # a dependency of accelerate, so always installed with alpaca-nb

__all__ = ["EXIT_STATUS_SIGTERM", "Terminated", "sigterm_raises", "start_in_own_session", "stop_process_tree"]

EXIT_STATUS_SIGTERM = 128 + signal.SIGTERM  # 143

# Runs in the child in place of the command, then becomes it (same pid): it asks the kernel for SIGTERM when
# the parent thread ends. Not preexec_fn: that runs Python between fork and exec, which the subprocess docs
# call unsafe in a process with threads (Jupyter kernels, torch and the openai client all have them), since a
# lock another thread held at fork time is never released in the child. PR_SET_PDEATHSIG = 1.
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0) != 0:
    sys.exit("alpaca_nb.processes: prctl(PR_SET_PDEATHSIG) failed: " + os.strerror(ctypes.get_errno()))
if os.getppid() != int(sys.argv[1]):
    sys.exit("alpaca_nb.processes: the parent ended before this process started; not starting")
os.execvp(sys.argv[2], sys.argv[2:])
"""


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM inside :func:`sigterm_raises`; ``with`` blocks clean up as it passes.

    A ``SystemExit`` (status 143), not a ``KeyboardInterrupt``: code that treats Ctrl-C as "stop and report"
    must not turn a scheduler's SIGTERM into a normal exit, and ``except Exception`` does not swallow it.
    """

    def __init__(self) -> None:
        super().__init__(EXIT_STATUS_SIGTERM)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, the first SIGTERM raises :class:`Terminated` in the main thread; a second one ends the
    process at once (the default). Outside the main thread, where Python cannot set handlers, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(_signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a cleanup that hangs can still be ended by a second one
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def start_in_own_session(command: Sequence[str], **popen_options: Any) -> subprocess.Popen:
    """Start ``command`` as the leader of a new session; on Linux it also gets SIGTERM when the thread that
    started it ends (so keep the process within a ``with`` block of the thread that starts it)."""
    if sys.platform.startswith("linux"):
        command = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
    return subprocess.Popen(list(command), start_new_session=True, **popen_options)


def stop_process_tree(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop ``process``, its process group and all its descendants: SIGTERM, up to ``grace_s`` seconds for them
    to end, then SIGKILL for those left. Descendants are listed before the signal, while they are still its
    children: a Jupyter kernel starts a session of its own, so signalling the group alone would miss it."""
    if process.poll() is not None:
        return
    descendants = _descendants(process.pid)
    _signal_group(process, signal.SIGTERM)
    _signal_each(descendants, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()
    _, left = psutil.wait_procs(descendants, timeout=max(0.0, deadline - time.monotonic()))
    _signal_each(left, signal.SIGKILL)
    psutil.wait_procs(left, timeout=5)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    # The leader is not reaped yet (poll() said so), so its pid still names its group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _signal_each(processes: list[psutil.Process], signum: int) -> None:
    for each in processes:
        # psutil refuses a pid that a new process has taken since the list was made.
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            each.send_signal(signum)
