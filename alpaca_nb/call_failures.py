"""What a failed call to an OpenAI-compatible server was, and whether another attempt may help: the errors
:class:`~alpaca_nb.llm.Endpoint` raises (never holding the API key), each attempt's failure classified (429 with
its ``Retry-After``, 5xx, timeouts, dropped connections and unusable 200 bodies are retried; 400, 401, 403, 404...
are not), and the capped exponential backoff with full jitter between attempts.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any, Mapping

import httpx
import openai

__all__ = [
    "AuthenticationError", "LLMError",
]


class LLMError(RuntimeError):
    """A call to the LLM failed for good; the message says why (and never contains the API key)."""


class AuthenticationError(LLMError):
    """The server answered HTTP 401: the API key is missing or wrong."""


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
