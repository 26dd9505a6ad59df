"""The embedded model behind llama.cpp's own OpenAI-compatible server: :func:`local_server` starts the embedded
SmolLM2-135M-Instruct GGUF behind ``llama-server`` (built by the set-up with portable CPU flags), so the whole
pipeline runs offline; :func:`serve` runs it in the foreground. The server decodes several requests at once in
parallel slots (continuous batching). If the server process dies, calls to it raise :class:`ServerExitedError`
at once instead of retrying a closed port. The server ends with the process that started it, on SIGTERM too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from alpaca_nb.call_failures import LLMError
from alpaca_nb.processes import start_in_own_session, stop_process_tree

__all__ = [
    "LOCAL_MODEL_ALIAS", "LocalServer", "ServerExitedError", "llama_server_binary", "local_server", "serve",
    "server_build_info",
]

LOCAL_MODEL_ALIAS = "smollm2-135m-instruct"  # the model name the server answers to


class ServerExitedError(LLMError):
    """The local llama.cpp server process is gone (crashed, killed, out of memory): retrying cannot help."""


@dataclass(frozen=True)
class LocalServer:
    """A running local server: pass ``base_url`` and ``model`` to :class:`Endpoint`."""

    base_url: str
    model: str
    pid: int
    log_path: Path


class _ServerProcess:
    """A started server process and its log, so that a failed call can tell a dead server from a slow one."""

    def __init__(self, process: subprocess.Popen, log: Path) -> None:
        self.process, self.log = process, log

    def exit_message(self, grace_seconds: float = 0.0) -> str | None:
        """Return why the process is gone (exit code or signal, the log's path and tail), or None while it runs.

        ``grace_seconds``: a killed server's sockets close while the kernel is still ending the process, so a
        failed call can arrive before the exit is visible; wait that long for it.
        """
        try:
            code = self.process.wait(timeout=grace_seconds) if grace_seconds > 0 else self.process.poll()
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return None
        return (f"the local llama.cpp server (pid {self.process.pid}) exited: {_describe_exit(code)}; "
                f"its log is {self.log}; last lines:\n{_log_tail(self.log)}")


# base_url -> the process serving it; Endpoint consults it when a call to that URL fails.
_LOCAL_SERVERS: dict[str, _ServerProcess] = {}


def _exited_server_message(base_url: str | None) -> str | None:
    server = _LOCAL_SERVERS.get(base_url or "")
    return server.exit_message(grace_seconds=0.5) if server is not None else None


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hints = {
        "SIGILL": " (an instruction this CPU refuses: rebuild llama-server with other CPU flags, "
                  "`make llama-server LLAMA_CPU_FLAGS=...`; see the README)",
        "SIGKILL": " (killed: by a user, or by the kernel when memory ran out)",
    }
    return f"killed by {name}{hints.get(name, '')}"


def llama_server_binary() -> Path:
    """Return the ``llama-server`` executable: ``$ALPACA_NB_LLAMA_SERVER``, beside this Python, or on PATH."""
    override = os.environ.get("ALPACA_NB_LLAMA_SERVER")
    if override:
        path = Path(override).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LLMError(f"$ALPACA_NB_LLAMA_SERVER={override}: not an executable file")
        return path
    beside_python = Path(sys.executable).parent / "llama-server"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    raise LLMError("llama.cpp's llama-server is not built: run `make llama-server` (or `make setup`) in the "
                   "alpaca-nb checkout, about 10 minutes, or point $ALPACA_NB_LLAMA_SERVER at a llama-server binary")


def server_build_info(binary: Path | None = None) -> dict[str, str]:
    """Return how ``llama-server`` was built (source, sha256, CMake flags) from the file the set-up wrote beside it."""
    binary = binary or llama_server_binary()
    info = binary.with_name(binary.name + ".build.json")
    if not info.is_file():
        return {}
    try:
        return json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def local_server(
    gguf: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    n_ctx: int | None = None,
    parallel: int | None = None,
    startup_timeout: float = 120.0,
    log_path: Path | None = None,
) -> Iterator[LocalServer]:
    """Run llama.cpp's ``llama-server`` on ``gguf`` (default: the embedded SmolLM2) for the ``with`` block.

    ``parallel`` slots share ``n_ctx`` tokens of context (each slot gets ``n_ctx / parallel``); both
    default to the profile's ``server_parallel`` and ``server_context``. ``port=None`` picks a free
    port. The server's output goes to ``log_path`` (a temporary file when None, removed afterwards
    unless the server died). If the process exits while the block runs, calls to it raise
    :class:`ServerExitedError` at once, naming the exit and the log. The server runs in a session of its own
    and, on Linux, gets SIGTERM if the thread that started it ends, even by SIGKILL (:mod:`alpaca_nb.processes`).
    """
    with _running_server(gguf, host, port, n_ctx, parallel, startup_timeout, log_path) as (server, _process):
        yield server


def serve(gguf: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000, n_ctx: int | None = None,
          parallel: int | None = None) -> int:
    """Run the local server in the foreground until Ctrl-C; return 0, or the server's exit code if it died."""
    with _running_server(gguf, host, port, n_ctx, parallel, 120.0, None) as (server, process):
        print(f"Serving {server.model!r} at {server.base_url} (OpenAI-compatible). Press Ctrl-C to stop.", flush=True)
        try:
            code = process.wait()
        except KeyboardInterrupt:
            return 0
        print(_ServerProcess(process, server.log_path).exit_message(), file=sys.stderr)
        return code if code > 0 else 1


@contextlib.contextmanager
def _running_server(gguf: str | Path | None, host: str, port: int | None, n_ctx: int | None, parallel: int | None,
                    startup_timeout: float, log_path: Path | None) -> Iterator[tuple[LocalServer, subprocess.Popen]]:
    model_path = _model_path(gguf)
    binary = llama_server_binary()
    if n_ctx is None or parallel is None:
        from alpaca_nb.profiles import current_profile

        profile = current_profile()
        n_ctx = profile.server_context if n_ctx is None else n_ctx
        parallel = profile.server_parallel if parallel is None else parallel
    port = port or _free_port(host)
    log = Path(log_path) if log_path is not None else _temporary_log()
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [str(binary), "--model", str(model_path), "--alias", LOCAL_MODEL_ALIAS, "--host", host,
               "--port", str(port), "--ctx-size", str(n_ctx), "--parallel", str(parallel),
               "--threads", str(os.cpu_count() or 1), "--no-webui"]
    with open(log, "ab") as log_file:  # the child keeps its own copy of the descriptor
        # Its own session, and on Linux SIGTERM when this thread ends: a SLURM SIGTERM or a killed kernel must
        # not leave the server running (alpaca_nb.processes says how).
        process = start_in_own_session(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    # A server bound to every interface is still reached through the loopback address.
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    server = LocalServer(base_url=f"http://{client_host}:{port}/v1", model=LOCAL_MODEL_ALIAS, pid=process.pid,
                         log_path=log)
    watched = _ServerProcess(process, log)
    died = False
    try:
        _wait_until_ready(server, watched, startup_timeout)
        _LOCAL_SERVERS[server.base_url] = watched
        yield server, process
    finally:
        _LOCAL_SERVERS.pop(server.base_url, None)
        died = process.poll() is not None
        _stop(process)
        if log_path is None and not died:  # a crashed server's log is named in the error: keep it
            log.unlink(missing_ok=True)


def _model_path(gguf: str | Path | None) -> Path:
    if gguf is None:
        from alpaca_nb.models import embedded_gguf_path  # imports torch: only when the default is wanted

        return embedded_gguf_path()
    path = Path(gguf).expanduser()
    if not path.is_file():
        raise LLMError(f"{path}: no such GGUF model file")
    return path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host if host not in ("", "::") else "0.0.0.0", 0))
        return probe.getsockname()[1]


def _temporary_log() -> Path:
    handle, name = tempfile.mkstemp(prefix="alpaca-nb-llama-server-", suffix=".log")
    os.close(handle)
    return Path(name)


def _wait_until_ready(server: LocalServer, watched: _ServerProcess, timeout: float) -> None:
    """Poll ``GET /health`` until it answers 200 (the model is loaded); raise LLMError if the process dies or time runs out."""
    # No proxies: a corporate HTTP_PROXY must not intercept a request to our own loopback server.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    health = server.base_url.removesuffix("/v1") + "/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = watched.exit_message()
        if exited is not None:
            raise ServerExitedError(f"{exited}\n(it never answered {health})")
        try:
            with opener.open(health, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while the model loads
        time.sleep(0.1)
    raise LLMError(f"the llama.cpp server did not answer {health} within {timeout:g} s; "
                   f"last lines of its log ({server.log_path}):\n{_log_tail(server.log_path)}")


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(log unreadable)"


def _stop(process: subprocess.Popen) -> None:
    """Stop our own server and its process group: SIGTERM, up to 10 s, then SIGKILL."""
    stop_process_tree(process, grace_s=10.0)
