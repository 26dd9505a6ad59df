"""The LLM judge: both orders, ties on disagreement, caching, the ledger and its budget guard, calibration.

The judges here are scripted behind a local HTTP stub that speaks OpenAI's chat-completions shape. It is a
stub for this one purpose: to give verdicts whose correct tally is known in advance (a judge without
position bias, one that always says "Output (a)"). The real embedded judge runs in chapter 5 and in
test_a_real_server_judges_in_both_orders.
"""

from __future__ import annotations

import re

import pytest

from alpaca_nb.costs import Ledger
from alpaca_nb.data import PairwiseJudgement, load_alpaca_eval_annotations
from alpaca_nb.judge import (
    PairVerdict, calibrate, judge_pairs, judge_prompt, parse_choice, verdict_records, verdict_win_rate,
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
