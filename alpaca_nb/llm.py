"""Call an OpenAI-compatible LLM with recorded, bounded retries (the embedded model's server: ``llama_server``).

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

Which failures are retried, and the errors raised, are ``call_failures``'. :func:`local_server` (in
``llama_server``, re-exported here with the errors) serves the embedded model offline; it decodes several
requests at once, so throughput comes from concurrent requests, e.g. ``asyncio.gather`` over
:meth:`Endpoint.acomplete`. If the server process dies, calls to it raise :class:`ServerExitedError` at once
instead of retrying a closed port.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Protocol

import openai

from alpaca_nb.call_failures import (
    _ATTEMPT_ERRORS, AuthenticationError, LLMError, _backoff_s, _classify, _Failure, _parse_completion,
)
from alpaca_nb.llama_server import (
    LOCAL_MODEL_ALIAS, LocalServer, ServerExitedError, _exited_server_message, llama_server_binary, local_server, serve,
    server_build_info,
)

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

_APIS = ("chat", "completions")
# Keyless local servers still need *some* bearer token for the client to send.
_KEY_PLACEHOLDER = "not-set"


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
