"""The LLM judge: both orders, ties on disagreement, caching, the ledger and its budget guard, calibration.

The judges here are scripted behind a local HTTP stub that speaks OpenAI's chat-completions shape. It is a
stub for this one purpose: to give verdicts whose correct tally is known in advance (a judge without
position bias, one that always says "Output (a)"). The real embedded judge runs in chapter 5 and in
test_a_real_server_judges_in_both_orders.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

from alpaca_nb.costs import Ledger, count_tokens
from alpaca_nb.data import PairwiseJudgement, load_alpaca_eval_annotations
from alpaca_nb.judge import (
    JUDGE_MAX_TOKENS, PairVerdict, calibrate, judge_pairs, judge_prompt, parse_choice, verdict_records, verdict_win_rate,
)
from alpaca_nb.llm import Endpoint
from json_stub import JsonStub


def _answers(prompt: str) -> tuple[str, str]:
    found = re.search(r"## Output \(a\)\n\n(.*)\n\n## Output \(b\)\n\n(.*)\n\nWhich output", prompt, re.DOTALL)
    return found.group(1), found.group(2)


class ScriptedJudge:
    """A stub judge server: ``decide(output_a, output_b)`` returns its reply text."""

    def __init__(self, decide):
        self.decide, self.calls = decide, 0
        self.stub = JsonStub(self._respond)

    def _respond(self, _path: str, body: dict) -> dict:
        self.calls += 1
        text = self.decide(*_answers(body["messages"][0]["content"]))
        return {"id": f"stub-{self.calls}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 200, "completion_tokens": 4, "total_tokens": 204}}

    def endpoint(self) -> Endpoint:
        return Endpoint(self.stub.base_url, "gpt-4o-mini", max_retries=0, timeout=10)

    def close(self):
        self.stub.close()


@pytest.fixture
def scripted():
    judges = []

    def start(decide):
        judges.append(ScriptedJudge(decide))
        return judges[-1]

    yield start
    for judge in judges:
        judge.close()


def pair(one: str, two: str, instruction: str = "Say something.") -> PairwiseJudgement:
    return PairwiseJudgement(instruction, one, two, "reference", "model", None)


PAIRS = [pair("GOOD answer", "weak answer", "q1"), pair("weak answer", "GOOD answer", "q2"),
         pair("GOOD one", "GOOD two", "q3")]


def prefers_good(a: str, b: str) -> str:
    return "Output (a)" if "GOOD" in a and "GOOD" not in b else "Output (b)" if "GOOD" in b and "GOOD" not in a \
        else "Output (a)"


def test_the_prompt_names_its_three_fields_and_the_reply_is_parsed_strictly():
    assert {"{instruction}", "{output_a}", "{output_b}"} <= set(re.findall(r"\{\w+\}", judge_prompt()))
    assert parse_choice("Output (a)") == "a" and parse_choice("output(b).") == "b"
    assert parse_choice("Output b") == "b" and parse_choice("I like both") is None
    assert parse_choice("Output (a) or Output (b)") is None


def test_words_that_begin_with_a_or_b_after_output_are_not_a_choice():
    assert parse_choice("The first output better follows the instruction.") is None
    assert parse_choice("The output above is better") is None
    assert parse_choice("Output (b) is better; output above is wordy.") == "b"
    assert parse_choice("OUTPUT A") == "a"


def test_cached_judgements_are_read_again_from_the_judges_own_words(scripted, tmp_path):
    judge = scripted(prefers_good)
    cache, ledger = tmp_path / "judgements.jsonl", tmp_path / "ledger.jsonl"
    first = judge_pairs(judge.endpoint(), PAIRS, ledger, cache=cache)
    assert all(v.first_order is not None for v in first.verdicts)
    # A cache written by an older parser that misread the reply "The output above is better" as "a".
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    for record in records:
        record.update(choice="a", reply="The output above is better")
    cache.write_text("".join(json.dumps(record) + "\n" for record in records))
    again = judge_pairs(judge.endpoint(), PAIRS, ledger, cache=cache)
    assert judge.calls == 6  # nothing asked again
    assert [(v.first_order, v.swapped_order) for v in again.verdicts] == [(None, None)] * len(PAIRS)


def test_each_pair_is_judged_in_both_orders_and_a_disagreement_is_a_tie(scripted, tmp_path):
    judge = scripted(prefers_good)
    run = judge_pairs(judge.endpoint(), PAIRS, tmp_path / "ledger.jsonl")
    assert judge.calls == 6 and run.stopped_reason is None
    assert [v.preference for v in run.verdicts] == [1, 2, 0]  # q3: "(a)" both times, a position preference
    assert [v.consistent for v in run.verdicts] == [True, True, False]
    result = verdict_win_rate(run.verdicts)
    assert (result.wins, result.losses, result.ties) == (1, 1, 1)
    assert verdict_records(run.verdicts)[2] == {"instruction": "q3", "first_order": "a", "swapped_order": "a",
                                                "preference": 0}


def test_a_judge_that_always_picks_the_first_answer_gives_only_ties(scripted, tmp_path):
    judge = scripted(lambda a, b: "Output (a)")
    run = judge_pairs(judge.endpoint(), PAIRS, tmp_path / "ledger.jsonl")
    assert [v.preference for v in run.verdicts] == [0, 0, 0]


def test_judgements_are_cached_and_every_call_is_in_the_ledger_as_stage_judge(scripted, tmp_path):
    judge = scripted(prefers_good)
    cache, ledger = tmp_path / "judgements.jsonl", tmp_path / "ledger.jsonl"
    first = judge_pairs(judge.endpoint(), PAIRS, ledger, cache=cache)
    again = judge_pairs(judge.endpoint(), PAIRS, ledger, cache=cache)
    assert judge.calls == 6 and again.verdicts == first.verdicts
    entries = Ledger(ledger).entries
    assert len(entries) == 6 and {e.stage for e in entries} == {"judge"} and {e.outcome for e in entries} == {"ok"}
    assert first.spent_usd == pytest.approx(6 * (200 * 0.15 + 4 * 0.60) / 1e6, rel=0.05)


def test_the_budget_guard_stops_the_judge_before_it_could_overspend(scripted, tmp_path):
    judge = scripted(prefers_good)
    # Each call's worst case is about 260 prompt tokens and 8 completion tokens at gpt-4o-mini's price.
    run = judge_pairs(judge.endpoint(), PAIRS, tmp_path / "ledger.jsonl", budget_usd=0.0001, concurrency=1)
    assert run.stopped_reason.startswith("stopped before the budget could be exceeded")
    assert judge.calls < 6 and None in run.verdicts
    assert run.spent_usd <= 0.0001


def test_a_judge_retry_needs_its_own_reservation_and_the_failed_attempt_is_booked(scripted, tmp_path):
    """FaultProxy (tests/faultproxy.py) answers the first call with a 500 in front of the scripted stub judge."""
    from faultproxy import FaultProxy

    judge = scripted(prefers_good)
    ledger_path = tmp_path / "ledger.jsonl"
    with FaultProxy(judge.stub.base_url, faults=["500"]) as proxy:
        endpoint = Endpoint(proxy.base_url, "gpt-4o-mini", max_retries=2, timeout=10, backoff_base=0.01)
        prompt_tokens = count_tokens(judge_prompt().format(instruction="q1", output_a="GOOD answer",
                                                           output_b="weak answer"), "gpt-4o-mini")
        worst = Ledger(tmp_path / "probe.jsonl").worst_case_usd("gpt-4o-mini", prompt_tokens, JUDGE_MAX_TOKENS)
        # Room for one attempt's worst case, not for a retry's beside the failed one's.
        run = judge_pairs(endpoint, PAIRS[:1], ledger_path, budget_usd=1.5 * worst, concurrency=1)
        assert proxy.requests_seen == 1 and judge.calls == 0  # the retry was never sent
    assert run.stopped_reason.startswith("stopped before the budget could be exceeded")
    [entry] = Ledger(ledger_path).entries
    # The 500 may have been billed: booked at the worst case, marked as an estimate, not as a free attempt.
    assert (entry.outcome, entry.status, entry.usage_estimated) == ("error", 500, True)
    assert (entry.prompt_tokens, entry.completion_tokens) == (prompt_tokens, JUDGE_MAX_TOKENS)
    assert run.spent_usd == pytest.approx(worst)


def test_ctrl_c_while_judging_cancels_the_queued_calls_and_keeps_the_answered_ones(scripted, tmp_path):
    """The scripted judge sends this process SIGINT (what Ctrl-C and Jupyter's interrupt send) on its second call."""
    def interrupt_on_second_call(a: str, b: str) -> str:
        if judge.calls == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return prefers_good(a, b)

    judge = scripted(interrupt_on_second_call)
    pairs = [pair(f"GOOD {n}", f"weak {n}", f"q{n}") for n in range(8)]  # 16 calls in all
    cache, ledger = tmp_path / "judgements.jsonl", tmp_path / "ledger.jsonl"
    with pytest.raises(KeyboardInterrupt):
        judge_pairs(judge.endpoint(), pairs, ledger, cache=cache, concurrency=2)
    # After the interrupt, at most the calls already in flight (the concurrency) were made; none was queued on.
    assert judge.calls <= 2 + 2
    # What was answered is kept: every call is cached and ledgered, so a rerun asks only the rest.
    assert len(cache.read_text().splitlines()) == len(Ledger(ledger).entries) == judge.calls
    judge_pairs(judge.endpoint(), pairs, ledger, cache=cache, concurrency=2)
    assert judge.calls == 16


def test_ctrl_c_landing_in_the_progress_bar_also_cancels_the_queued_calls(scripted, tmp_path, monkeypatch):
    """In Jupyter the main thread spends much of its time drawing the bar's widget, so the interrupt often lands
    there rather than in the wait for a reply; the bar here raises KeyboardInterrupt as it draws the second reply."""
    import alpaca_nb.judge as judge_module

    def bar_interrupted_at_the_second_reply(iterable, **_):
        for done, item in enumerate(iterable, start=1):
            if done == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(judge_module, "progress_bar", bar_interrupted_at_the_second_reply)
    judge = scripted(prefers_good)
    pairs = [pair(f"GOOD {n}", f"weak {n}", f"q{n}") for n in range(8)]  # 16 calls in all
    with pytest.raises(KeyboardInterrupt):
        judge_pairs(judge.endpoint(), pairs, tmp_path / "ledger.jsonl", cache=tmp_path / "judgements.jsonl",
                    concurrency=2)
    assert judge.calls <= 2 + 2  # two answered, at most the two in flight: the twelve queued were cancelled
    assert len(Ledger(tmp_path / "ledger.jsonl").entries) == judge.calls


def test_calibration_against_gpt4_counts_agreement_and_contradictions():
    reference = load_alpaca_eval_annotations()[:4]  # GPT-4's preferences for these four pairs
    decisive = [r for r in reference if r.preference in (1.0, 2.0)]
    agreeing = [PairVerdict(r.instruction, "a", "b") if r.preference == 1 else PairVerdict(r.instruction, "b", "a")
                for r in decisive]
    calibration = calibrate(agreeing, decisive)
    assert (calibration.pairs, calibration.agreement, calibration.contradictions) == (len(decisive), 1.0, 0.0)
    first_only = [PairVerdict(r.instruction, "a", "a") for r in decisive]
    biased = calibrate(first_only, decisive)
    assert (biased.agreement, biased.contradictions, biased.first_position) == (0.0, 1.0, 1.0)
    assert biased.contradictions_ci[0] < 1.0 == biased.contradictions_ci[1]
    with pytest.raises(ValueError, match="verdicts for"):
        calibrate(first_only[:1], decisive)


def test_a_real_server_judges_in_both_orders(llama_server, tmp_path):
    endpoint = Endpoint(llama_server.base_url, llama_server.model, timeout=120)
    pairs = load_alpaca_eval_annotations()[:2]
    run = judge_pairs(endpoint, pairs, tmp_path / "ledger.jsonl", cache=tmp_path / "judgements.jsonl")
    assert run.stopped_reason is None and all(v is not None for v in run.verdicts)
    assert len(Ledger(tmp_path / "ledger.jsonl").entries) == 4 and run.spent_usd == 0.0
    assert len((tmp_path / "judgements.jsonl").read_text().splitlines()) == 4


def _calibration(agree: int, pairs: int):
    from alpaca_nb.evaluate import wilson_interval
    from alpaca_nb.judge import Calibration

    return Calibration(pairs, agree / pairs, wilson_interval(agree, pairs), 0.0, wilson_interval(0, pairs), 0.5)


def test_a_judge_below_the_agreement_floor_is_not_usable_and_says_why():
    from alpaca_nb.judge import MIN_JUDGE_AGREEMENT, judge_usability

    low = judge_usability(_calibration(1, 16))  # the laptop build's 135M judge: 6 % of 16 pairs
    assert not low.usable and "6% of 16 pairs" in low.reason and f"{MIN_JUDGE_AGREEMENT:.0%} floor" in low.reason
    assert judge_usability(_calibration(11, 16)).usable  # 69 %, about GPT-4's agreement with humans
    assert not judge_usability(None).usable


def test_the_verdict_table_withholds_an_unusable_judges_win_rate_but_keeps_its_counts(scripted, tmp_path):
    from alpaca_nb.judge import judge_usability, verdict_table

    run = judge_pairs(scripted(prefers_good).endpoint(), PAIRS, tmp_path / "ledger.jsonl")
    shown = verdict_table({"system": run}, judge_usability(_calibration(11, 16)))
    hidden = verdict_table({"system": run}, judge_usability(_calibration(1, 16)))
    assert shown.loc["system", "win rate"] == pytest.approx(verdict_win_rate(run.verdicts).rate)
    assert hidden.loc["system", ["win rate", "95% low", "95% high", "sign-test p"]].isna().all()
    assert hidden.loc["system", "wins"] == shown.loc["system", "wins"]
