"""alpaca_nb.llm against the real embedded llama.cpp server, and through a fault-injecting proxy."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request

import psutil
import pytest

from alpaca_nb.llm import (AuthenticationError, CallRecord, Endpoint, LLMError, ServerExitedError, llama_server_binary,
                           local_server, server_build_info)
from alpaca_nb.profiles import current_profile

FAKE_KEY = "sk-test-SECRET123"


def make_endpoint(base_url: str, model: str, records: list[CallRecord], **options) -> Endpoint:
    """An Endpoint with short waits so that retry tests stay fast; records collects every attempt."""
    settings = {"timeout": 20.0, "max_retries": 3, "backoff_base": 0.05, "backoff_max": 0.2, **options}
    return Endpoint(base_url, model, on_call=records.append, **settings)


def outcomes(records: list[CallRecord]) -> list[str]:
    return [record.outcome for record in records]


# -- real calls ----------------------------------------------------------------------------------


def test_chat_call_returns_text_usage_and_one_ok_record(llama_server):
    records: list[CallRecord] = []
    endpoint = make_endpoint(llama_server.base_url, llama_server.model, records)
    result = endpoint.complete("What is the capital of France? Answer in one word.", max_tokens=12, temperature=0)
    # The GGUF's ChatML template is applied: a coherent answer, not a continuation of raw text.
    assert "paris" in result.text.lower()
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert result.finish_reason in ("stop", "length")
    assert (result.attempts, result.model) == (1, llama_server.model)
    [record] = records
    assert (record.outcome, record.status, record.error, record.attempt) == ("ok", 200, "", 1)
    assert (record.prompt_tokens, record.completion_tokens) == (result.prompt_tokens, result.completion_tokens)
    assert record.request_id == result.request_id and record.request_id


def test_completions_call_returns_text_usage_and_one_ok_record(llama_server):
    records: list[CallRecord] = []
    endpoint = make_endpoint(llama_server.base_url, llama_server.model, records, api="completions")
    result = endpoint.complete("The three primary colours are", max_tokens=8, temperature=0)
    assert result.text.strip()
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert result.finish_reason in ("stop", "length")
    assert outcomes(records) == ["ok"] and records[0].api == "completions"


def test_a_message_list_is_sent_as_is_to_the_chat_api(llama_server):
    endpoint = make_endpoint(llama_server.base_url, llama_server.model, [])
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "What colour is the sky on a clear day?"}]
    assert "blue" in endpoint.complete(messages, max_tokens=20, temperature=0).text.lower()


def test_max_tokens_cuts_the_completion_with_finish_reason_length(llama_server):
    endpoint = make_endpoint(llama_server.base_url, llama_server.model, [])
    result = endpoint.complete("Write a long story about a dragon.", max_tokens=5, temperature=0)
    assert result.finish_reason == "length"
    assert result.completion_tokens == 5


def test_a_stop_sequence_ends_the_completion(llama_server):
    endpoint = make_endpoint(llama_server.base_url, llama_server.model, [], api="completions")
    result = endpoint.complete("1, 2, 3, 4, 5, 6,", max_tokens=30, temperature=0, stop=["9"])
    assert result.finish_reason == "stop"
    assert "9" not in result.text and "7" in result.text


def test_prompt_shapes_are_checked_before_any_request():
    endpoint = Endpoint("http://127.0.0.1:9/v1", "m", api="completions")
    with pytest.raises(ValueError, match="api='chat'"):
        endpoint.complete([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="streaming"):
        endpoint.complete("hi", stream=True)


# -- retries through the fault proxy -------------------------------------------------------------


@pytest.mark.parametrize(("fault", "status", "error", "timeout"), [
    ("500", 500, "500 Internal Server Error", 20.0),
    ("truncate", 200, "invalid response body", 20.0),
    ("garbage", 200, "invalid response body", 20.0),
    ("stall", None, "timeout", 3.0),  # short, as the stalled attempt waits for it; the retry takes < 1 s
])
def test_a_transient_fault_is_retried_then_succeeds(fault_proxy, llama_server, fault, status, error, timeout):
    """Faults are injected by FaultProxy in front of the real server; the retry reaches the server."""
    proxy = fault_proxy([fault])
    records: list[CallRecord] = []
    endpoint = make_endpoint(proxy.base_url, llama_server.model, records, timeout=timeout)
    result = endpoint.complete("Say hello.", max_tokens=4)
    assert result.text and result.attempts == 2
    assert outcomes(records) == ["retry", "ok"]
    assert (records[0].status, records[0].error, records[0].attempt) == (status, error, 1)
    # One record per HTTP request: the openai client made no retries of its own.
    assert proxy.requests_seen == len(records) and proxy.faults_injected == [fault]


def test_429_waits_the_retry_after_seconds(fault_proxy, llama_server):
    """FaultProxy injects a 429 with Retry-After: 1 in front of the real server."""
    proxy = fault_proxy(["429"])
    records: list[CallRecord] = []
    result = make_endpoint(proxy.base_url, llama_server.model, records).complete("Say hello.", max_tokens=4)
    assert result.latency_s >= 1.0  # the backoff alone would be at most 0.05 s
    assert outcomes(records) == ["retry", "ok"]
    assert (records[0].status, records[0].error) == (429, "429 Too Many Requests")


def test_429_with_retry_after_zero_does_not_fall_back_to_backoff(fault_proxy, llama_server):
    """FaultProxy injects a 429 with Retry-After: 0; a long backoff shows whether the header won."""
    proxy = fault_proxy(["429:0"])
    records: list[CallRecord] = []
    endpoint = make_endpoint(proxy.base_url, llama_server.model, records, backoff_base=30.0, backoff_max=30.0)
    result = endpoint.complete("Say hello.", max_tokens=4)
    assert result.latency_s < 5.0 and outcomes(records) == ["retry", "ok"]


def test_exhausting_retries_raises_naming_the_last_error(fault_proxy, llama_server):
    """FaultProxy injects three faults; max_retries=2 allows exactly three attempts."""
    proxy = fault_proxy(["500", "429:0", "garbage"])
    records: list[CallRecord] = []
    endpoint = make_endpoint(proxy.base_url, llama_server.model, records, max_retries=2)
    with pytest.raises(LLMError, match="after 3 attempts; last error: invalid response body"):
        endpoint.complete("Say hello.", max_tokens=4)
    assert outcomes(records) == ["retry", "retry", "error"]
    assert [record.attempt for record in records] == [1, 2, 3]
    assert proxy.requests_seen == 3


def test_401_fails_at_once_without_revealing_the_key(fault_proxy, llama_server, monkeypatch):
    """FaultProxy answers 401 and, like a careless server, echoes the bearer key in its message."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    proxy = fault_proxy(["401"])
    records: list[CallRecord] = []
    endpoint = make_endpoint(proxy.base_url, llama_server.model, records)
    with pytest.raises(AuthenticationError, match=r"\$OPENAI_API_KEY is missing or wrong") as caught:
        endpoint.complete("Say hello.", max_tokens=4)
    [record] = records
    assert (record.outcome, record.status, record.attempt) == ("error", 401, 1)
    assert proxy.requests_seen == 1
    shown = [str(caught.value), "".join(traceback.format_exception(caught.value)), repr(record), repr(endpoint)]
    assert not any(FAKE_KEY in text for text in shown)


def test_404_is_not_retried(llama_server):
    records: list[CallRecord] = []
    wrong_path = llama_server.base_url + "/no-such-api"  # POST /v1/no-such-api/chat/completions does not exist
    endpoint = make_endpoint(wrong_path, llama_server.model, records)
    with pytest.raises(LLMError, match="HTTP 404 Not Found") as caught:
        endpoint.complete("Say hello.", max_tokens=4)
    assert not isinstance(caught.value, AuthenticationError)
    assert outcomes(records) == ["error"] and records[0].status == 404


# -- budget: one reservation per attempt, billable failures booked --------------------------------


def ledgered_endpoint(base_url: str, model: str, ledger, **options) -> tuple[Endpoint, list[float]]:
    """An endpoint whose every attempt is priced into ``ledger``, and the dollars reserved as each was recorded."""
    held_at_record: list[float] = []

    def record(call: CallRecord) -> None:
        held_at_record.append(ledger.reserved_usd)
        ledger.record(call, stage="test")

    endpoint = make_endpoint(base_url, model, [], **options)
    endpoint.on_call = record
    return endpoint, held_at_record


def test_each_retry_reserves_again_and_a_failed_attempt_is_booked_at_the_estimate(fault_proxy, llama_server, tmp_path):
    """FaultProxy injects a 500, a 429 and a cut 200 body in front of the real server; priced as gpt-4o-mini."""
    from alpaca_nb.costs import Ledger

    proxy = fault_proxy(["500", "429:0", "truncate"])
    ledger = Ledger(tmp_path / "ledger.jsonl", price_as="gpt-4o-mini")
    endpoint, held_at_record = ledgered_endpoint(proxy.base_url, llama_server.model, ledger)
    budget = ledger.call_budget(llama_server.model, 100, 4)
    worst = ledger.worst_case_usd(llama_server.model, 100, 4)
    result = endpoint.complete("Say hello.", budget=budget, max_tokens=4)
    entries = ledger.entries
    assert [e.outcome for e in entries] == ["retry", "retry", "retry", "ok"] and result.attempts == 4
    # The 500 and the cut body reached the server and may be billed: booked at the worst case, and marked so. The
    # 429 was refused before any work: nothing is booked. The success carries the server's own count.
    assert [(e.prompt_tokens, e.completion_tokens, e.usage_estimated) for e in entries[:3]] == \
        [(100, 4, True), (0, 0, False), (100, 4, True)]
    assert (entries[3].prompt_tokens, entries[3].usage_estimated) == (result.prompt_tokens, False)
    assert ledger.total_usd == pytest.approx(2 * worst + entries[3].cost_usd)
    # While a failed attempt is booked, the retry's own reservation is already held beside it.
    assert held_at_record == [pytest.approx(2 * worst)] * 3 + [pytest.approx(worst)]
    assert ledger.reserved_usd == 0.0 and budget.held == 0


def test_a_retry_the_budget_cannot_cover_is_not_sent(fault_proxy, llama_server, tmp_path):
    """FaultProxy injects a 500; the budget covers one attempt's worst case, not a second beside it."""
    from alpaca_nb.costs import BudgetExceeded, Ledger

    proxy = fault_proxy(["500"])
    probe = Ledger(tmp_path / "probe.jsonl", price_as="gpt-4o-mini")
    worst = probe.worst_case_usd(llama_server.model, 100, 4)
    ledger = Ledger(tmp_path / "ledger.jsonl", budget_usd=1.5 * worst, price_as="gpt-4o-mini")
    endpoint, _ = ledgered_endpoint(proxy.base_url, llama_server.model, ledger)
    with pytest.raises(BudgetExceeded, match=r"budget \$"):
        endpoint.complete("Say hello.", budget=ledger.call_budget(llama_server.model, 100, 4), max_tokens=4)
    assert proxy.requests_seen == 1
    [entry] = ledger.entries
    assert (entry.outcome, entry.status, entry.usage_estimated) == ("error", 500, True)
    assert entry.cost_usd == pytest.approx(worst) and ledger.reserved_usd == 0.0


# -- async ---------------------------------------------------------------------------------------


def test_concurrent_async_calls_all_complete(llama_server):
    records: list[CallRecord] = []
    endpoint = make_endpoint(llama_server.base_url, llama_server.model, records)
    prompts = [f"Name a fruit that starts with the letter {letter}." for letter in "ABCD"]

    async def run_all():
        return await asyncio.gather(*(endpoint.acomplete(prompt, max_tokens=6) for prompt in prompts))

    results = asyncio.run(run_all())
    assert all(result.text and result.completion_tokens > 0 for result in results)
    assert outcomes(records) == ["ok"] * len(prompts)
    assert len({result.request_id for result in results}) == len(prompts)


def test_async_calls_retry_like_sync_ones(fault_proxy, llama_server):
    """FaultProxy injects a 500 and a garbage body among three concurrent async calls."""
    proxy = fault_proxy(["500", "garbage"])
    records: list[CallRecord] = []
    endpoint = make_endpoint(proxy.base_url, llama_server.model, records)

    async def run_all():
        return await asyncio.gather(*(endpoint.acomplete("Say hello.", max_tokens=4) for _ in range(3)))

    results = asyncio.run(run_all())
    assert sum(result.attempts for result in results) == 5
    assert sorted(outcomes(records)) == ["ok"] * 3 + ["retry"] * 2


# -- the local server's life cycle ---------------------------------------------------------------


def test_local_server_stops_its_process_on_exit(llama_server):
    with local_server() as server:
        assert server.model == "smollm2-135m-instruct" and server.base_url.endswith("/v1")
        os.kill(server.pid, 0)  # running
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)


def test_local_server_rejects_a_missing_model_file(tmp_path):
    with pytest.raises(LLMError, match="no such GGUF model file"):
        with local_server(tmp_path / "absent.gguf"):
            pass


def test_local_server_reports_the_log_when_the_server_dies(tmp_path):
    not_a_model = tmp_path / "junk.gguf"
    not_a_model.write_bytes(b"this is not a GGUF file")
    with pytest.raises(ServerExitedError, match="exited: exit code 1; its log is .*last lines"):
        with local_server(not_a_model, startup_timeout=60):
            pass


def test_a_server_killed_during_a_request_is_reported_as_dead_at_once(tmp_path):
    """SIGKILL the real server by its pid while a long completion is in flight."""
    log = tmp_path / "server.log"
    records: list[CallRecord] = []
    with local_server(log_path=log) as server:
        endpoint = make_endpoint(server.base_url, server.model, records, max_retries=5, backoff_base=1.0)
        caught: list[BaseException] = []

        def long_request() -> None:
            try:
                endpoint.complete("Write a long story about a dragon.", max_tokens=1500, temperature=0)
            except BaseException as error:  # noqa: BLE001 - handed to the test thread
                caught.append(error)

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(1.0)  # the request is being decoded
        os.kill(server.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        worker.join(timeout=30)
        assert not worker.is_alive()
        assert time.monotonic() - killed_at < 5  # no retries with backoff against the closed port
        [error] = caught
        assert isinstance(error, ServerExitedError)
        assert f"(pid {server.pid}) exited: killed by SIGKILL" in str(error) and str(log) in str(error)
        assert [record.outcome for record in records] == ["error"]
        # The next call fails the same way, at once, instead of retrying a port that nobody opens again.
        with pytest.raises(ServerExitedError, match="killed by SIGKILL"):
            endpoint.complete("Say hello.", max_tokens=4)
    assert log.is_file()


def test_a_crashing_server_binary_is_reported_with_its_signal(tmp_path, monkeypatch):
    """A stand-in binary that dies of SIGILL on start, as a natively built llama.cpp did on an AMX VM."""
    crashing = tmp_path / "llama-server"
    crashing.write_text("#!/bin/sh\necho 'pretending to load'\nkill -ILL $$\n")
    crashing.chmod(0o755)
    monkeypatch.setenv("ALPACA_NB_LLAMA_SERVER", str(crashing))
    with pytest.raises(ServerExitedError, match=r"killed by SIGILL \(an instruction this CPU refuses.*LLAMA_CPU_FLAGS"):
        with local_server(startup_timeout=30):
            pass


def start_alpaca_nb_serve() -> tuple[subprocess.Popen, psutil.Process]:
    """Start `alpaca-nb serve` on a free port; return it and its llama-server once that answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve = subprocess.Popen([sys.executable, "-m", "alpaca_nb.cli", "serve", "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_line = serve.stdout.readline()  # "Serving ... Press Ctrl-C to stop." once /health answers
    if "Serving" not in first_line:
        serve.kill()
        pytest.fail(f"alpaca-nb serve did not start: {first_line}{serve.communicate()[1]}")
    [server] = psutil.Process(serve.pid).children()
    assert "llama-server" in " ".join(server.cmdline())
    return serve, server


def gone_within(process: psutil.Process, seconds: float) -> bool:
    """Return whether ``process`` ended within ``seconds``; if not, kill it so that the test leaves nothing behind."""
    _, alive = psutil.wait_procs([process], timeout=seconds)
    for survivor in alive:
        survivor.kill()
    return not alive


def test_sigterm_to_alpaca_nb_serve_stops_its_server_and_exits_143():
    """As a SLURM time limit does: the server must not be left running, orphaned."""
    serve, server = start_alpaca_nb_serve()
    assert os.getsid(server.pid) == server.pid  # its own session: a terminal's Ctrl-C goes to alpaca-nb alone
    serve.send_signal(signal.SIGTERM)
    _, stderr = serve.communicate(timeout=60)
    assert gone_within(server, 5), f"llama-server (pid {server.pid}) outlived the SIGTERMed alpaca-nb serve"
    assert serve.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["alpaca-nb serve: stopped by SIGTERM"]


def test_a_killed_alpaca_nb_serve_takes_its_server_along():
    """SIGKILL runs no cleanup: the server's parent-death signal (Linux) must end it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's prctl(PR_SET_PDEATHSIG)")
    serve, server = start_alpaca_nb_serve()
    serve.kill()
    serve.communicate(timeout=30)
    assert gone_within(server, 5), f"llama-server (pid {server.pid}) outlived the SIGKILLed alpaca-nb serve"


def test_the_server_has_the_profiles_parallel_slots(llama_server):
    profile = current_profile()
    with urllib.request.urlopen(llama_server.base_url.removesuffix("/v1") + "/props", timeout=10) as response:
        properties = json.load(response)
    assert properties["total_slots"] == profile.server_parallel


def test_the_built_server_holds_no_amx_instruction():
    """Portable flags: an AMX tile instruction would die with SIGILL where a VM advertises AMX but refuses it."""
    binary = llama_server_binary()
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(binary)], capture_output=True,
                                 text=True, check=True).stdout
    assert disassembly.count("\n") > 100_000  # really disassembled: ggml's kernels are in this one file
    amx = [line for line in disassembly.splitlines() if any(op in line for op in ("tilezero", "ldtilecfg", "tdpb"))]
    assert amx == [], amx[:5]
    # ggml is linked statically, so no shared library escapes the check.
    linked = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    assert "ggml" not in linked and "llama" not in linked
    assert "-DGGML_NATIVE=OFF" in server_build_info(binary).get("cmake_flags", "")


def test_a_copied_endpoint_keeps_the_settings_but_not_the_hook_or_the_clients():
    hook_calls = []
    endpoint = Endpoint("http://127.0.0.1:9/v1", "m", api="completions", timeout=7, max_retries=2,
                        on_call=hook_calls.append)
    endpoint._openai_client()
    twin = endpoint.copy()
    settings = ("base_url", "model", "api_key_env", "api", "timeout", "max_retries", "backoff_base", "backoff_max")
    assert [getattr(twin, name) for name in settings] == [getattr(endpoint, name) for name in settings]
    assert twin.on_call is None and endpoint.on_call is not None
    assert twin._sync_client is None  # its own connection pool, opened on first use
