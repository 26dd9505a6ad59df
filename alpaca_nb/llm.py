"""Call an OpenAI-compatible LLM with recorded, bounded retries, and serve the embedded model locally.

Taught in chapter 2 (book/02_self_instruct.md). Self-instruct asks a teacher model for thousands
of completions, so every call goes through :class:`Endpoint`, which

* talks to any OpenAI-compatible server (OpenAI itself, vLLM, llama.cpp) through the official
  ``openai`` client, with the client's own retries switched off so that this loop sees every attempt;
* retries what is worth retrying (429 with its ``Retry-After``, 5xx, timeouts, dropped connections,
  a 200 whose body is not a usable completion) with capped exponential backoff and full jitter,
  and fails at once on the others (400, 401, 403, 404, ...);
* reports each HTTP attempt as a :class:`CallRecord` to ``on_call`` (tokens, latency, outcome), which
  is what the cost and throughput tables of the chapter are built from;
* never puts the API key in a message, repr or record.

:func:`local_server` starts the embedded SmolLM2-135M-Instruct GGUF behind llama.cpp's own
``llama-server`` (built by the set-up with portable CPU flags), so the whole pipeline runs offline;
:func:`serve` runs it in the foreground. The server decodes several requests at once in parallel
slots (continuous batching), so throughput comes from concurrent requests, e.g. ``asyncio.gather``
over :meth:`Endpoint.acomplete`. If the server process dies, calls to it raise
:class:`ServerExitedError` at once instead of retrying a closed port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import weakref
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, Protocol

import httpx
import openai

from alpaca_nb.processes import start_in_own_session, stop_process_tree

__all__ = [
    "LOCAL_MODEL_ALIAS",
    "AttemptBudget",
    "AuthenticationError",
    "CallRecord",
    "Completion",
    "Endpoint",
    "LLMError",
    "LocalServer",
    "ServerExitedError",
    "llama_server_binary",
    "local_server",
    "serve",
    "server_build_info",
]

LOCAL_MODEL_ALIAS = "smollm2-135m-instruct"
_APIS = ("chat", "completions")
# Keyless local servers still need *some* bearer token for the client to send.
_KEY_PLACEHOLDER = "not-set"


class LLMError(RuntimeError):
    """A call to the LLM failed for good; the message says why (and never contains the API key)."""


class AuthenticationError(LLMError):
    """The server answered HTTP 401: the API key is missing or wrong."""


@dataclass(frozen=True)
class CallRecord:
    """One HTTP attempt, as given to ``Endpoint.on_call``."""

    model: str
    api: str
    outcome: str  # "ok" | "retry" (failed, will be retried) | "error" (failed for good)
    status: int | None  # None for timeouts, connection errors
    error: str  # "" when ok, else short text such as "429 Too Many Requests" or "timeout"
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str | None
    request_id: str  # the server's response id, else a generated uuid4 hex
    attempt: int  # 1-based
    # True when the tokens are the call budget's worst-case estimate, not the server's count: a failed attempt
    # that reached the server (a timeout, a cut body, a 5xx, an interrupt) may have been billed without a usage
    # report, and the ledger must not book it as free.
    usage_estimated: bool = False


class AttemptBudget(Protocol):
    """Money held for one call, one reservation per HTTP attempt (``costs.Ledger.call_budget`` makes one).

    ``reserve`` raises (``costs.BudgetExceeded``) when one more attempt might not fit; the call then stops with
    that error instead of retrying. ``estimated_usage`` (prompt, completion tokens) is booked for a failed
    attempt the server may have billed without saying how much.
    """

    @property
    def held(self) -> int: ...

    @property
    def estimated_usage(self) -> tuple[int, int]: ...

    def reserve(self) -> None: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class Completion:
    """The text of a successful call, with its token usage and total cost in time and attempts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # wall time of the whole call, retries and waits included
    request_id: str
    model: str
    attempts: int


class Endpoint:
    """One model behind an OpenAI-compatible API: ``complete`` (sync) and ``acomplete`` (async).

    ``base_url=None`` means OpenAI's own API. The key is read once, here, from ``$api_key_env``; when
    it is unset a placeholder is sent (keyless local servers accept it, others answer 401).
    ``api`` is "chat" (messages) or "completions" (raw text). Each HTTP attempt waits at most
    ``timeout`` seconds; at most ``max_retries`` retries follow the first attempt, after
    ``Retry-After`` or a random wait of up to ``min(backoff_max, backoff_base * 2**(attempt-1))``.
    ``on_call`` receives a :class:`CallRecord` for every attempt. A ``budget`` passed to ``complete`` or
    ``acomplete`` is reserved again before every attempt, retries included (:class:`AttemptBudget`).
    """

    def __init__(
        self,
        base_url: str | None,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        api: str = "chat",
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        on_call: Callable[[CallRecord], None] | None = None,
    ) -> None:
        if api not in _APIS:
            raise ValueError(f"api={api!r}: expected one of {_APIS}")
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries}: must be 0 or more")
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.api = api
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.on_call = on_call
        self._api_key = os.environ.get(api_key_env) or _KEY_PLACEHOLDER
        self._sync_client: openai.OpenAI | None = None
        # An AsyncOpenAI's connection pool belongs to the event loop that opened it: one client per loop,
        # kept with the async generator that closes it when that loop shuts down.
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[openai.AsyncOpenAI, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def copy(self) -> "Endpoint":
        """Return an endpoint with the same settings and key but its own clients and no ``on_call`` hook, for a
        second run beside this one (``selfinstruct.generate`` sets the hook to its own ledger)."""
        return Endpoint(self.base_url, self.model, self.api_key_env, self.api, self.timeout, self.max_retries,
                        self.backoff_base, self.backoff_max)

    def __repr__(self) -> str:
        return (f"Endpoint(base_url={self.base_url!r}, model={self.model!r}, api={self.api!r}, "
                f"api_key_env={self.api_key_env!r})")

    def complete(self, prompt: str | list[dict], *, budget: AttemptBudget | None = None, **sampling: Any) -> Completion:
        """Return the model's completion of ``prompt``, retrying transient failures (blocking).

        With ``budget``, each attempt holds its own reservation; when the budget refuses one, its error is raised.
        """
        call = _Call(self, prompt, sampling, budget)
        client = self._openai_client()
        try:
            while True:
                call.start_attempt()
                try:
                    return call.succeeded(call.send(client))
                except _ATTEMPT_ERRORS as exc:
                    wait_s = call.failed(exc)  # raises LLMError when there is no next attempt
                time.sleep(wait_s)
        except (KeyboardInterrupt, asyncio.CancelledError):
            call.interrupted()
            raise
        finally:
            call.release_budget()

    async def acomplete(self, prompt: str | list[dict], *, budget: AttemptBudget | None = None,
                        **sampling: Any) -> Completion:
        """Like :meth:`complete`, for ``asyncio``: run many with ``asyncio.gather`` for throughput. Cancelling the
        task cancels the attempt in flight (booked as an interrupted attempt) and starts no other."""
        call = _Call(self, prompt, sampling, budget)
        client = await self._async_openai_client()
        try:
            while True:
                call.start_attempt()
                try:
                    return call.succeeded(await call.send(client))
                except _ATTEMPT_ERRORS as exc:
                    wait_s = call.failed(exc)
                await asyncio.sleep(wait_s)
        except (KeyboardInterrupt, asyncio.CancelledError):
            call.interrupted()
            raise
        finally:
            call.release_budget()

    def _client_options(self) -> dict[str, Any]:
        # max_retries=0: the client must not retry behind our back, or attempts would go unrecorded.
        return {"api_key": self._api_key, "base_url": self.base_url, "timeout": self.timeout, "max_retries": 0}

    def stream(self, prompt: str | list[dict], **sampling: Any) -> Iterator[str]:
        """Yield the completion of ``prompt`` piece by piece as the server sends it (``stream=True``; chapter 6's
        demo). One attempt, no retries: a broken stream cannot be resumed. ``on_call`` is not called, since a
        stream reports no usage to record."""
        request = _request_arguments(self.model, self.api, prompt, sampling)
        client = self._openai_client()
        resource = client.chat.completions if self.api == "chat" else client.completions
        try:
            for chunk in resource.create(**request, stream=True):
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                piece = choice.delta.content if self.api == "chat" else choice.text
                if piece:
                    yield piece
        except _ATTEMPT_ERRORS as exc:
            failure = _classify(exc)
            raise LLMError(f"{self.model} at {self.base_url}: the stream failed: {failure.error}") from exc

    def _openai_client(self) -> openai.OpenAI:
        if self._sync_client is None:
            self._sync_client = openai.OpenAI(**self._client_options())
        return self._sync_client

    async def _async_openai_client(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        if loop not in self._async_clients:
            client = openai.AsyncOpenAI(**self._client_options())
            closer = _close_at_loop_shutdown(client)
            self._async_clients[loop] = (client, closer)
            await closer.__anext__()  # now the loop tracks it, and asyncio.run() will close it
        return self._async_clients[loop][0]

    def _scrub(self, text: str) -> str:
        """Remove the API key from text that came from elsewhere (servers may echo it)."""
        if self._api_key != _KEY_PLACEHOLDER and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return text


async def _close_at_loop_shutdown(client: openai.AsyncOpenAI) -> AsyncIterator[None]:
    """Suspend until the event loop shuts down, then close ``client`` while the loop still runs.

    Event loops close their live async generators on shutdown (``asyncio.run`` does, through
    ``loop.shutdown_asyncgens()``), so the client's pooled connections do not outlive their loop.
    """
    try:
        yield
    finally:
        await client.close()


class _InvalidBody(Exception):
    """A response arrived but its body is not a usable completion (truncated, not JSON, no choices)."""

    def __init__(self, status: int | None) -> None:
        super().__init__("invalid response body")
        self.status = status


# What one attempt can end with; anything else (a TypeError from a bad argument) is a bug, not a retry.
_ATTEMPT_ERRORS = (openai.APIError, _InvalidBody)


@dataclass(frozen=True)
class _Failure:
    """What went wrong in one attempt, and whether another attempt may help."""

    status: int | None
    error: str  # short, for the CallRecord
    detail: str  # the server's own message, for the final LLMError (may echo the key: scrub it)
    retryable: bool
    retry_after_s: float | None
    request_id: str
    may_be_billed: bool = False  # the request reached the server, which may have done (and billed) the work
    reported_usage: tuple[int, int] | None = None  # (prompt, completion) tokens, when the error body gave them


class _Call:
    """The state of one ``complete``/``acomplete`` call; all retry logic shared by both shells."""

    def __init__(self, endpoint: Endpoint, prompt: str | list[dict], sampling: dict[str, Any],
                 budget: AttemptBudget | None = None) -> None:
        self.endpoint = endpoint
        self.request = _request_arguments(endpoint.model, endpoint.api, prompt, sampling)
        self.budget = budget
        self.started = time.monotonic()
        self.attempt = 0
        self.attempt_started = self.started
        self.in_flight = False  # an attempt was sent and has not been recorded yet

    def start_attempt(self) -> None:
        if self.budget is not None and self.budget.held == 0:
            self.budget.reserve()  # raises when this attempt might not fit: nothing is sent
        self.attempt += 1
        self.attempt_started = time.monotonic()
        self.in_flight = True

    def send(self, client: openai.OpenAI | openai.AsyncOpenAI) -> Any:
        """Issue the request; returns the raw response (a coroutine of it for the async client)."""
        resource = client.chat.completions if self.endpoint.api == "chat" else client.completions
        # The raw response keeps the HTTP status, so an unusable 200 body can be recorded as such.
        return resource.with_raw_response.create(**self.request)

    def succeeded(self, raw: Any) -> Completion:
        """Parse a 2xx response, record the attempt as "ok" and build the Completion."""
        text, finish_reason, usage, request_id = _parse_completion(raw, self.endpoint.api)
        prompt_tokens, completion_tokens = usage
        now = time.monotonic()
        self._record("ok", raw.status_code, "", now - self.attempt_started, request_id,
                     prompt_tokens, completion_tokens, finish_reason)
        self._attempt_done()
        return Completion(text=text, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                          completion_tokens=completion_tokens, latency_s=now - self.started,
                          request_id=request_id, model=self.endpoint.model, attempts=self.attempt)

    def failed(self, exc: Exception) -> float:
        """Record a failed attempt; return the wait before the next one, or raise when there is none."""
        failure = _classify(exc)
        exited = _exited_server_message(self.endpoint.base_url) if failure.retryable else None
        final = exited is not None or not failure.retryable or self.attempt > self.endpoint.max_retries
        if not final and self.budget is not None:
            try:
                self.budget.reserve()  # the retry's own reservation, taken while this attempt's is still held
            except Exception as refusal:  # the budget refuses the retry: this attempt was the last
                self._record_failure("error", failure)
                raise refusal from None  # the failed attempt's exception may quote the key: keep it out of tracebacks
        self._record_failure("error" if final else "retry", failure)
        if exited is not None:
            raise ServerExitedError(f"{self.endpoint.model} at {self.endpoint.base_url}: {exited}") from None
        if final:
            raise self._final_error(failure) from None  # the cause may quote the key: keep it out of tracebacks
        if failure.retry_after_s is not None:
            return failure.retry_after_s
        return _backoff_s(self.attempt, self.endpoint.backoff_base, self.endpoint.backoff_max)

    def interrupted(self) -> None:
        """Book an attempt cut off by Ctrl-C or a cancelled task: the server may finish and bill it anyway."""
        if self.in_flight:
            self._record_failure("error", _Failure(None, "interrupted", "", False, None, uuid.uuid4().hex,
                                                   may_be_billed=True))

    def release_budget(self) -> None:
        """Give back every reservation still held (a retry's, when the call ended during its wait)."""
        while self.budget is not None and self.budget.held > 0:
            self.budget.release()

    def _record_failure(self, outcome: str, failure: _Failure) -> None:
        """Record a failed attempt with the usage the server reported, else the budget's estimate when the server
        may have billed it, else no tokens; then give back its reservation."""
        usage, estimated = failure.reported_usage, False
        if usage is None and failure.may_be_billed and self.budget is not None:
            usage, estimated = self.budget.estimated_usage, True
        prompt_tokens, completion_tokens = usage or (0, 0)
        self._record(outcome, failure.status, failure.error, time.monotonic() - self.attempt_started,
                     failure.request_id, prompt_tokens, completion_tokens, usage_estimated=estimated)
        self._attempt_done()

    def _attempt_done(self) -> None:
        self.in_flight = False
        if self.budget is not None and self.budget.held > 0:
            self.budget.release()

    def _record(self, outcome: str, status: int | None, error: str, latency_s: float, request_id: str,
                prompt_tokens: int = 0, completion_tokens: int = 0, finish_reason: str | None = None,
                usage_estimated: bool = False) -> None:
        if self.endpoint.on_call is None:
            return
        self.endpoint.on_call(CallRecord(
            model=self.endpoint.model, api=self.endpoint.api, outcome=outcome, status=status, error=error,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, latency_s=latency_s,
            finish_reason=finish_reason, request_id=request_id, attempt=self.attempt, usage_estimated=usage_estimated))

    def _final_error(self, failure: _Failure) -> LLMError:
        endpoint = self.endpoint
        where = f"{endpoint.model} ({endpoint.api} API at {endpoint.base_url or 'the OpenAI default URL'})"
        if failure.status == 401:
            return AuthenticationError(endpoint._scrub(f"{where}: HTTP 401 Unauthorized: the API key in "
                                                       f"${endpoint.api_key_env} is missing or wrong"))
        detail = f": {failure.detail}" if failure.detail else ""
        if not failure.retryable:
            return LLMError(endpoint._scrub(f"{where}: HTTP {failure.error}{detail} (not retried)"))
        hint = " (is a server listening there? check the base URL)" if failure.error.startswith("connection") else ""
        return LLMError(endpoint._scrub(f"{where}: gave up after {self.attempt} attempts; "
                                        f"last error: {failure.error}{detail}{hint}"))


def _request_arguments(model: str, api: str, prompt: str | list[dict], sampling: dict[str, Any]) -> dict[str, Any]:
    """Build the keyword arguments of ``create`` for one prompt."""
    reserved = {"model", "messages", "prompt", "stream"} & sampling.keys()
    if reserved:
        raise ValueError(f"{sorted(reserved)} cannot be sampling options (the prompt and model are given "
                         "separately; streaming is not supported)")
    if isinstance(prompt, str):
        payload = {"messages": [{"role": "user", "content": prompt}]} if api == "chat" else {"prompt": prompt}
    elif isinstance(prompt, list) and all(isinstance(message, dict) for message in prompt):
        if api != "chat":
            raise ValueError("a list of messages needs api='chat'; the completions API takes one string prompt")
        payload = {"messages": prompt}
    else:
        raise ValueError(f"prompt must be a string or a list of message dicts, not {type(prompt).__name__}")
    return {"model": model, **payload, **sampling}


def _parse_completion(raw: Any, api: str) -> tuple[str, str, tuple[int, int], str]:
    """Return (text, finish_reason, (prompt_tokens, completion_tokens), request_id) or raise _InvalidBody."""
    try:
        body = raw.parse()
        choice = body.choices[0]
        text = choice.message.content if api == "chat" else choice.text
        if text is not None and not isinstance(text, str):
            raise TypeError(f"text is a {type(text).__name__}")
        usage = body.usage
        tokens = (int(usage.prompt_tokens), int(usage.completion_tokens)) if usage is not None else (0, 0)
        return text or "", choice.finish_reason or "", tokens, body.id or uuid.uuid4().hex
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        # Not JSON (ValueError), or JSON that is not a completion (a str body has no .choices).
        raise _InvalidBody(raw.status_code) from None


def _classify(exc: Exception) -> _Failure:
    """Turn the exception of one attempt into a _Failure (status, short error, retryable?)."""
    fresh_id = uuid.uuid4().hex
    if isinstance(exc, _InvalidBody):  # a 2xx whose body was cut or mangled: the work was done
        return _Failure(exc.status, "invalid response body", "", True, None, fresh_id, may_be_billed=True)
    if isinstance(exc, openai.APITimeoutError):
        # A request that was sent may still be finished (and billed) after the client stopped waiting.
        sent = not isinstance(exc.__cause__, httpx.ConnectTimeout)
        return _Failure(None, "timeout", "", True, None, fresh_id, may_be_billed=sent)
    if isinstance(exc, openai.APIConnectionError):
        cause = type(exc.__cause__).__name__ if exc.__cause__ else "connection failed"
        sent = not isinstance(exc.__cause__, httpx.ConnectError)  # dropped mid-response, not refused
        return _Failure(None, f"connection error ({cause})", "", True, None, fresh_id, may_be_billed=sent)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retryable = status == 429 or status >= 500
        retry_after = _retry_after_s(exc.response.headers) if retryable else None
        # A 4xx (429 included) is refused before any generation; a 5xx may come after the work was done.
        return _Failure(status, _status_text(status), _server_message(exc.body), retryable, retry_after,
                        exc.request_id or fresh_id, may_be_billed=status >= 500,
                        reported_usage=_reported_usage(exc.body))
    if isinstance(exc, openai.APIResponseValidationError):
        return _Failure(exc.status_code, "invalid response body", "", True, None, fresh_id, may_be_billed=True)
    return _Failure(None, type(exc).__name__, "", False, None, fresh_id)


def _reported_usage(body: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an error body's ``usage`` object, when the server sent one."""
    usage = body.get("usage") if isinstance(body, Mapping) else None
    if not isinstance(usage, Mapping):
        return None
    prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt_tokens, int) and isinstance(completion_tokens, int):
        return prompt_tokens, completion_tokens
    return None


def _status_text(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _server_message(body: object) -> str:
    """The human part of an error body: {"error": {"message": ...}} (OpenAI) or {"detail": ...} (FastAPI)."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            message = inner.get("message") or inner.get("detail") or ""
        else:
            message = inner
        body = message
    return str(body or "")[:300]


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (a number or an HTTP date), or None."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _backoff_s(attempt: int, base: float, cap: float) -> float:
    """Capped exponential backoff with full jitter: concurrent clients do not retry in lockstep."""
    return random.uniform(0.0, min(cap, base * 2 ** (attempt - 1)))


# -- the embedded model behind llama.cpp's own OpenAI-compatible server ----------------------------


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
