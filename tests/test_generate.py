"""The generation loop end to end against the real embedded llama.cpp server.

Faults are injected with the real HTTP proxy in tests/faultproxy.py (no mocks); the kill test
SIGKILLs a real `alpaca-nb generate` process at random moments and resumes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from alpaca_nb.costs import Ledger
from alpaca_nb.data import load_seed_tasks
from alpaca_nb.llm import Endpoint
from alpaca_nb.rouge import RougeLFilter
from alpaca_nb.selfinstruct import SamplingSettings, filter_reason, format_constraint, generate, read_generated

SHORT = SamplingSettings(max_tokens=48)


def endpoint_for(base_url: str, model: str, **options) -> Endpoint:
    return Endpoint(base_url, model, api="completions", timeout=options.pop("timeout", 120), backoff_base=0.05, **options)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_generate_keeps_filtered_novel_records_and_ledgers_every_call(llama_server, tmp_path):
    endpoint = endpoint_for(llama_server.base_url, llama_server.model)
    report = generate(endpoint, 1, tmp_path, concurrency=2, sampling=SamplingSettings(max_tokens=384), max_requests=8,
                      progress=False)
    records = read_generated(tmp_path)
    assert report.kept == len(records) and report.requests == len(lines(tmp_path / "requests.jsonl"))
    assert report.stopped_reason.startswith("done")
    # Every kept record passed the upstream filters and was novel against the pool as it was then.
    pool = RougeLFilter([task.instruction for task in load_seed_tasks()])
    for record in records:
        assert filter_reason(record["instruction"]) is None
        assert record["max_similarity"] == pool.max_similarity(record["instruction"]) <= 0.7
        assert set(record) >= {"instruction", "input", "output", "max_similarity", "most_similar", "request_id"}
        pool.add(record["instruction"])
    ledger = Ledger(tmp_path / "ledger.jsonl")
    assert len(ledger.entries) == report.requests and all(e.outcome == "ok" and e.prompt_tokens > 0 for e in ledger.entries)
    assert ledger.total_usd == 0.0  # the embedded server costs nothing
    funnel = report.funnel()
    assert funnel["kept (not near-duplicates)"] == report.kept and funnel["generated blocks"] >= funnel["parsed"]


def test_a_finished_run_resumes_without_new_requests(llama_server, tmp_path):
    endpoint = endpoint_for(llama_server.base_url, llama_server.model)
    first = generate(endpoint, 50, tmp_path, concurrency=2, sampling=SHORT, max_requests=3, progress=False)
    second = generate(endpoint, 50, tmp_path, concurrency=2, sampling=SHORT, max_requests=3, progress=False)
    assert first.requests == second.requests == 3
    assert len(Ledger(tmp_path / "ledger.jsonl").entries) == 3


def test_injected_faults_are_retried_and_every_attempt_is_ledgered(llama_server, fault_proxy, tmp_path):
    proxy = fault_proxy(faults=("429:0", "500", "stall", "truncate", "garbage"))
    endpoint = endpoint_for(proxy.base_url, llama_server.model, timeout=8)
    report = generate(endpoint, 50, tmp_path, concurrency=1, sampling=SHORT, max_requests=2, progress=False)
    assert report.stopped_reason == "done: request limit reached" and report.requests == 2
    entries = Ledger(tmp_path / "ledger.jsonl").entries
    outcomes = [entry.outcome for entry in entries]
    assert outcomes.count("retry") == 5 and outcomes.count("ok") == 2 and "error" not in outcomes
    assert proxy.requests_seen == 7
    # The 429 was refused before any work; the others reached the server, which may bill them: each is booked at
    # the request's worst case (its prompt and the token cap) and marked as an estimate.
    retries = [entry for entry in entries if entry.outcome == "retry"]
    assert [entry.usage_estimated for entry in retries] == [False, True, True, True, True]
    assert {entry.completion_tokens for entry in retries[1:]} == {SHORT.max_tokens} and retries[0].prompt_tokens == 0


def _interrupt_at_the_first_reply(endpoint: Endpoint, proxy) -> list[int]:
    """Send this process SIGINT (what Ctrl-C and Jupyter's interrupt send) when the first reply is recorded;
    returns the list that receives how many requests the proxy had seen by then."""
    seen_at_interrupt: list[int] = []

    def hook(call) -> None:
        if call.outcome == "ok" and not seen_at_interrupt:
            seen_at_interrupt.append(proxy.requests_seen)
            os.kill(os.getpid(), signal.SIGINT)

    endpoint.on_call = hook
    return seen_at_interrupt


def _check_interrupted_run_resumes(endpoint: Endpoint, out_dir: Path) -> None:
    """The files an interrupted run left are consistent, and the same call finishes the run from them."""
    entries = Ledger(out_dir / "ledger.jsonl").entries
    # The stalled request was cancelled in flight: booked as interrupted, at its worst case (the server may bill it).
    assert any(e.error == "interrupted" and e.usage_estimated and e.prompt_tokens > 0 for e in entries)
    finished = [entry["request"] for entry in lines(out_dir / "requests.jsonl")]
    assert len(finished) == len(set(finished)) >= 1
    assert {record["request"] for record in read_generated(out_dir)} <= set(finished)
    endpoint.on_call = None
    report = generate(endpoint, 1000, out_dir, concurrency=2, sampling=SHORT, max_requests=4, progress=False)
    assert report.requests == 4 and len(lines(out_dir / "requests.jsonl")) == 4


def test_ctrl_c_in_a_script_cancels_the_request_in_flight(llama_server, fault_proxy, tmp_path):
    """FaultProxy stalls one of the first two requests, so one is surely in flight when SIGINT arrives."""
    proxy = fault_proxy(faults=("pass", "stall"))
    endpoint = endpoint_for(proxy.base_url, llama_server.model)  # the stalled request would wait 120 s
    seen_at_interrupt = _interrupt_at_the_first_reply(endpoint, proxy)
    with pytest.raises(KeyboardInterrupt):
        generate(endpoint, 1000, tmp_path, concurrency=2, sampling=SHORT, max_requests=12, progress=False)
    assert proxy.requests_seen - seen_at_interrupt[0] <= 2  # at most the slot freed by the reply was refilled
    _check_interrupted_run_resumes(endpoint, tmp_path)


def test_ctrl_c_in_jupyter_cancels_the_requests_in_flight_and_starts_no_other(llama_server, fault_proxy, tmp_path):
    """A notebook cell runs while the kernel's event loop runs, so generate() drives its loop in a worker thread and
    SIGINT lands in the main thread, which waits for it. FaultProxy stalls one of the first two requests."""
    proxy = fault_proxy(faults=("pass", "stall"))
    endpoint = endpoint_for(proxy.base_url, llama_server.model)  # the stalled request would wait 120 s
    seen_at_interrupt = _interrupt_at_the_first_reply(endpoint, proxy)

    async def cell() -> None:
        generate(endpoint, 1000, tmp_path, concurrency=2, sampling=SHORT, max_requests=12, progress=False)

    loop = asyncio.new_event_loop()  # as ipykernel's: run_until_complete leaves SIGINT to Python's own handler
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(cell())
    finally:
        loop.close()
    assert proxy.requests_seen - seen_at_interrupt[0] <= 2  # at most the slot freed by the reply was refilled
    _check_interrupted_run_resumes(endpoint, tmp_path)


def test_a_401_stops_the_run_with_a_message_that_hides_the_key(llama_server, fault_proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET123")
    proxy = fault_proxy(faults=("401",))
    endpoint = endpoint_for(proxy.base_url, llama_server.model)
    report = generate(endpoint, 5, tmp_path, concurrency=1, sampling=SHORT, max_requests=3, progress=False)
    assert "OPENAI_API_KEY" in report.stopped_reason and "SECRET123" not in report.stopped_reason
    assert [entry.outcome for entry in Ledger(tmp_path / "ledger.jsonl").entries] == ["error"]
    assert "SECRET123" not in (tmp_path / "ledger.jsonl").read_text()


def test_budget_cap_never_starts_a_request_that_could_overspend(llama_server, tmp_path):
    endpoint = endpoint_for(llama_server.base_url, llama_server.model)
    seeds = load_seed_tasks()
    # Priced as text-davinci-003: a worst-case request (~700-token prompt + 48) costs about $0.015.
    budget = 0.035
    report = generate(endpoint, 100, tmp_path, budget_usd=budget, concurrency=1, sampling=SHORT, seed_tasks=seeds,
                      price_as="text-davinci-003", max_requests=10, progress=False)
    assert report.stopped_reason.startswith("stopped before the budget could be exceeded")
    assert 1 <= report.requests < 10
    assert 0 < report.spent_usd <= budget


def test_unpriced_models_fail_before_any_request(llama_server, tmp_path):
    endpoint = endpoint_for(llama_server.base_url, "some-vllm-model")
    with pytest.raises(KeyError, match="no price known for model 'some-vllm-model'"):
        generate(endpoint, 1, tmp_path, progress=False)
    assert not (tmp_path / "ledger.jsonl").exists()


def _cli(llama_server, out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "alpaca_nb.cli", "generate", "--base-url", llama_server.base_url,
            "--model", llama_server.model, "--api", "completions", "--num-instructions", "1000",
            "--out", str(out_dir), "--max-tokens", "160", "--concurrency", "2", "--max-requests", "8", "--seed", "3"]


def _state(out_dir: Path) -> tuple[list[str], set[int]]:
    kept = [record["instruction"] for record in read_generated(out_dir)]  # repairs a torn last line
    finished = {entry["request"] for entry in lines(out_dir / "requests.jsonl")} if (out_dir / "requests.jsonl").exists() else set()
    Ledger(out_dir / "ledger.jsonl")  # parses, or raises naming the bad line
    return kept, finished


def test_sigkill_at_random_moments_then_resume_loses_and_duplicates_nothing(llama_server, tmp_path):
    rng = random.Random(1234)
    out_dir = tmp_path / "run"
    seen_kept: list[str] = []
    finished_at_kills = []
    for _ in range(3):
        process = subprocess.Popen(_cli(llama_server, out_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        time.sleep(rng.uniform(4.0, 10.0))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kept, finished_requests = _state(out_dir)
        assert kept[: len(seen_kept)] == seen_kept, "a record kept before a kill was lost or changed"
        seen_kept = kept
        finished_at_kills.append(len(finished_requests))
    assert min(finished_at_kills) < 8, "no kill landed before the run ended; the test proved nothing"
    finished = subprocess.run(_cli(llama_server, out_dir), capture_output=True, text=True, timeout=400, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    kept, requests_done = _state(out_dir)
    assert kept[: len(seen_kept)] == seen_kept
    assert len(kept) == len(set(kept)), "a record was written twice"
    assert len(lines(out_dir / "requests.jsonl")) == len(requests_done) == 8


# -- format-constrained generation ---------------------------------------------------------------


@pytest.mark.parametrize(("api", "output_format"), [("completions", "grammar"), ("chat", "json_schema")])
def test_every_block_of_a_constrained_completion_parses(llama_server, tmp_path, api, output_format):
    """llama-server honours both: a GBNF grammar in extra_body, and an OpenAI-style json_schema response_format."""
    endpoint = Endpoint(llama_server.base_url, llama_server.model, api=api, timeout=300, backoff_base=0.05)
    constraint = replace(format_constraint(output_format), blocks=4)  # 4 tasks' JSON fits the 768-token cap
    report = generate(endpoint, 1000, tmp_path, concurrency=2, sampling=SamplingSettings(temperature=0.7, max_tokens=768),
                      max_requests=2, progress=False, constraint=constraint)
    counters = report.counters
    assert report.requests == 2 and counters["malformed"] == 0
    # Each completion holds the constraint's blocks; only a block cut by the token cap is lost.
    assert counters["blocks"] == 2 * constraint.blocks
    assert counters["blocks"] - counters["truncated"] >= 2 * constraint.blocks - 2
