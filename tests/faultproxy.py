"""A fault-injecting HTTP proxy on 127.0.0.1 for testing and benchmarking LLM clients.

``FaultProxy(upstream_base, faults=("429", "500"))`` sits in front of an OpenAI-compatible server
(for instance the embedded llama.cpp one). Each incoming request consumes the next fault of the
list; once the list is exhausted, requests pass through unchanged. Fault kinds:

=========  ===================================================================================
"429"      status 429 with ``Retry-After: 1``
"429:0"    status 429 with ``Retry-After: 0``
"500"      status 500 with a JSON error body
"stall"    read the request and never answer (the client's timeout has to fire)
"truncate" forward, then send only the first half of the body under a correct-looking 200 header
"garbage"  status 200, ``Content-Type: application/json`` and a body that is not JSON
"401"      status 401 whose message echoes the bearer key (as careless servers do)
"pass"     forward unchanged (a placeholder to put faults later in the list)
=========  ===================================================================================

``added_latency_s`` delays every forwarded request, which makes a local server behave like a
remote API for a concurrency benchmark. The proxy runs its own asyncio loop in a daemon thread,
listens only on 127.0.0.1 and serves one request per connection (``Connection: close``).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from typing import Sequence
from urllib.parse import urlsplit

FAULT_KINDS = ("429", "429:0", "500", "stall", "truncate", "garbage", "401", "pass")


class FaultProxy:
    """A real HTTP proxy that injects the given faults, one per request, in order."""

    def __init__(self, upstream_base: str, faults: Sequence[str] = (), added_latency_s: float = 0.0) -> None:
        unknown = [fault for fault in faults if fault not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
        upstream = urlsplit(upstream_base)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"{upstream_base!r}: the proxy forwards to plain http://host:port upstreams only")
        self._upstream_host = upstream.hostname
        self._upstream_port = upstream.port or 80
        self._path_prefix = upstream.path.rstrip("/")
        self._faults: deque[str] = deque(faults)
        self._added_latency_s = added_latency_s
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.requests_seen = 0
        self.faults_injected: list[str] = []

    @property
    def base_url(self) -> str:
        """The proxy's address with the upstream's path prefix (``http://127.0.0.1:PORT/v1``)."""
        if self.port is None:
            raise RuntimeError("the proxy is not started")
        return f"http://127.0.0.1:{self.port}{self._path_prefix}"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        """Bind a free port on 127.0.0.1 and serve from a background thread."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run_loop() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start() below, then the thread ends
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run_loop, name="FaultProxy", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener, drop open connections (stalled ones included) and join the thread."""
        if self._thread is None or self._loop is None:
            return
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- one connection, one request ---------------------------------------------------------

    def _next_fault(self) -> str:
        with self._lock:
            self.requests_seen += 1
            fault = self._faults.popleft() if self._faults else "pass"
            if fault != "pass":
                self.faults_injected.append(fault)
            return fault

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            request = await _read_request(reader)
            if request is not None:
                await self._respond(request, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away or sent a malformed request: nothing to answer
        except asyncio.CancelledError:
            pass  # stop() drops open connections; re-raising would only make asyncio log each one
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _respond(self, request: "_Request", reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fault = self._next_fault()
        if fault == "stall":
            await reader.read()  # hold the connection open until the client gives up
            return
        if fault in ("429", "429:0"):
            retry_after = fault.partition(":")[2] or "1"
            payload = _error_json("injected rate limit", "rate_limit_exceeded")
            writer.write(_response_bytes(429, "Too Many Requests", payload, {"Retry-After": retry_after}))
        elif fault == "500":
            writer.write(_response_bytes(500, "Internal Server Error", _error_json("injected server error", "server_error")))
        elif fault == "401":
            key = request.headers.get("authorization", "").removeprefix("Bearer ")
            payload = _error_json(f"Incorrect API key provided: {key}", "invalid_api_key")
            writer.write(_response_bytes(401, "Unauthorized", payload))
        elif fault == "garbage":
            writer.write(_response_bytes(200, "OK", b"<html>upstream hiccup \x00\xff not json"))
        else:
            await asyncio.sleep(self._added_latency_s)
            try:
                upstream_response = await self._forward(request)
            except OSError as exc:
                upstream_response = _response_bytes(502, "Bad Gateway", _error_json(f"upstream unreachable: {exc}", "bad_gateway"))
            writer.write(_truncated(upstream_response) if fault == "truncate" else upstream_response)
        await writer.drain()

    async def _forward(self, request: "_Request") -> bytes:
        """Send the request upstream on a fresh connection and return the raw response bytes."""
        up_reader, up_writer = await asyncio.open_connection(self._upstream_host, self._upstream_port)
        try:
            headers = {**request.headers, "host": f"{self._upstream_host}:{self._upstream_port}", "connection": "close"}
            head = f"{request.method} {request.target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            up_writer.write(head.encode("latin-1") + b"\r\n" + request.body)
            await up_writer.drain()
            return await up_reader.read()  # "Connection: close": the upstream ends the response with EOF
        finally:
            up_writer.close()


class _Request:
    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        self.method, self.target, self.headers, self.body = method, target, headers, body


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """Parse one HTTP/1.1 request with a Content-Length body (what the openai client sends)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # connection closed before a full request
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in filter(None, header_lines):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    headers.pop("connection", None)
    headers.pop("keep-alive", None)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return _Request(method, target, headers, body)


def _error_json(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": code, "code": code}}).encode()


def _response_bytes(status: int, reason: str, body: bytes, extra_headers: dict[str, str] | None = None) -> bytes:
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close"}
    headers.update(extra_headers or {})
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


def _truncated(raw_response: bytes) -> bytes:
    """Keep the upstream's status line and headers but only half of its (de-chunked) body."""
    head, _, body = raw_response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers.items()):
        body = _dechunk(body)
    half = body[: len(body) // 2]
    # A consistent Content-Length: the HTTP layer sees a valid response, only the JSON is cut.
    kept = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "transfer-encoding", "connection")}
    kept.update({"Content-Length": str(len(half)), "Connection": "close"})
    new_head = status_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in kept.items())
    return new_head.encode("latin-1") + b"\r\n" + half


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)
