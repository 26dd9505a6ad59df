"""Pytest fixtures for the embedded llama.cpp server and the fault-injecting proxy in front of it."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import pytest

from alpaca_nb.llm import LocalServer, local_server
from faultproxy import FaultProxy


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """The embedded SmolLM2 behind llama.cpp's OpenAI-compatible server, started once per session."""
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with local_server(log_path=log) as server:
        yield server


@pytest.fixture
def fault_proxy(llama_server: LocalServer) -> Iterator[Callable[..., FaultProxy]]:
    """A factory: ``fault_proxy(faults=("500",), added_latency_s=0.0)`` starts a FaultProxy in front
    of ``llama_server``; every proxy it started is stopped after the test."""
    started: list[FaultProxy] = []

    def start(faults: Sequence[str] = (), added_latency_s: float = 0.0) -> FaultProxy:
        proxy = FaultProxy(llama_server.base_url, faults=faults, added_latency_s=added_latency_s).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
