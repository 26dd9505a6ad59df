"""alpaca_nb.costs: the price table, token counts, and the ledger's sums, restart and budget."""

from __future__ import annotations

import json

import pytest
import tiktoken

from alpaca_nb.costs import BudgetExceeded, Ledger, LedgerEntry, PriceError, count_tokens, known_models, price
from alpaca_nb.llm import CallRecord


def call(model="gpt-4o-mini", prompt=1000, completion=500, outcome="ok", attempt=1) -> CallRecord:
    return CallRecord(model=model, api="chat", outcome=outcome, status=200 if outcome == "ok" else 500, error="",
                      prompt_tokens=prompt, completion_tokens=completion, latency_s=0.5, finish_reason="stop",
                      request_id="r", attempt=attempt)


def test_price_table_rows_are_dated_and_sourced():
    for model in known_models():
        row = price(model)
        assert row.input_per_1m >= 0 and row.output_per_1m >= 0 and 0 <= row.batch_discount < 1
        assert len(row.as_of) >= 7 and row.as_of[:4].isdigit() and row.source


def test_davinci_is_two_cents_per_thousand_tokens_both_ways():
    davinci = price("text-davinci-003")
    assert davinci.cost(1000, 0) == pytest.approx(0.02) and davinci.cost(0, 1000) == pytest.approx(0.02)
    assert davinci.as_of == "2023-03"


def test_dated_snapshots_and_prefixes_price_as_their_family():
    assert price("gpt-4o-mini-2024-07-18") == price("gpt-4o-mini") == price("openai/gpt-4o-mini")


def test_unknown_model_raises_listing_known_models():
    with pytest.raises(PriceError, match=r"no price known for model 'llama-9000'; known models: .*gpt-4o-mini"):
        price("llama-9000")


def test_batch_discount_halves_the_bill():
    assert price("gpt-4.1").cost(1_000_000, 1_000_000, batch=True) == pytest.approx(5.0)


def test_token_counts_match_tiktoken():
    assert count_tokens("hello world", "text-davinci-003") == 2
    text = "Give three tips for staying healthy. Übermäßig 🤖 tokens!"
    assert count_tokens(text, "text-davinci-003") == len(tiktoken.get_encoding("p50k_base").encode(text))
    assert count_tokens(text, "gpt-4o-mini") == len(tiktoken.get_encoding("o200k_base").encode(text))


def test_embedded_model_counts_with_its_own_tokenizer():
    assert 2 <= count_tokens("hello world", "smollm2-135m-instruct") <= 3


def test_ledger_sums_by_model_and_stage(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record(call(), stage="generate")
    ledger.record(call(outcome="retry", prompt=0, completion=0), stage="generate")
    ledger.record(call(model="text-davinci-003", prompt=1000, completion=1000), stage="judge")
    assert ledger.total_usd == pytest.approx(0.00045 + 0.04)
    by_model = ledger.summary("model")
    assert by_model.loc["gpt-4o-mini", "calls"] == 2 and by_model.loc["gpt-4o-mini", "retries"] == 1
    assert ledger.summary("stage").loc["judge", "cost_usd"] == pytest.approx(0.04)


def test_ledger_survives_a_restart_and_a_torn_last_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    Ledger(path).record(call(), stage="generate")
    with path.open("a") as handle:
        handle.write('{"time": 1, "stage": "gen')  # killed mid-write
    reopened = Ledger(path)
    assert len(reopened.entries) == 1 and reopened.total_usd == pytest.approx(0.00045)
    reopened.record(call(), stage="generate")
    assert [json.loads(line)["cost_usd"] for line in path.read_text().splitlines()] == [pytest.approx(0.00045)] * 2


def test_ledger_names_the_line_of_a_corrupt_entry(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"not": "an entry"}\n')
    with pytest.raises(ValueError, match=r"ledger\.jsonl, line 1: not a ledger entry"):
        Ledger(path)


def test_budget_refuses_a_request_whose_worst_case_does_not_fit(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", budget_usd=0.10)
    # text-davinci-003: 1000 prompt + 3072 completion tokens is at most $0.08144.
    assert not ledger.would_exceed("text-davinci-003", 1000, 3072)
    reservation = ledger.reserve("text-davinci-003", 1000, 3072)
    assert ledger.would_exceed("text-davinci-003", 1000, 3072)  # the in-flight reservation counts
    with pytest.raises(BudgetExceeded, match=r"budget \$0\.1000"):
        ledger.reserve("text-davinci-003", 1000, 3072)
    ledger.record(call(model="text-davinci-003", prompt=1000, completion=500), stage="generate")
    ledger.release(reservation)
    assert ledger.total_usd == pytest.approx(0.03)
    assert not ledger.would_exceed("text-davinci-003", 1000, 2000)


def test_price_as_prices_a_self_hosted_model(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", price_as="smollm2-135m-instruct")
    ledger.record(call(model="my-vllm-model"), stage="generate")
    assert ledger.total_usd == 0.0
    with pytest.raises(PriceError):
        Ledger(tmp_path / "other.jsonl").record(call(model="my-vllm-model"), stage="generate")


def test_ledger_entry_fields_are_the_documented_format():
    assert list(LedgerEntry.__dataclass_fields__) == [
        "time", "stage", "model", "api", "outcome", "status", "error", "prompt_tokens", "completion_tokens",
        "cost_usd", "latency_s", "request_id", "attempt"]
