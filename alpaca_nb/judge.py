"""The LLM judge: AlpacaEval-style pairwise verdicts from any endpoint, asked in both orders, and its calibration.

Taught in chapter 5 (book/05_evaluation.md). A judge is asked about each pair twice, with the answers
swapped; a pair whose two verdicts disagree counts as a tie, so a judge that only prefers the first (or
second) position adds nothing. Before its verdicts are used, ``calibrate`` measures how often it agrees
with GPT-4's published AlpacaEval judgements and how often it contradicts itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

from alpaca_nb.costs import BudgetExceeded, Ledger, count_tokens
from alpaca_nb.data import DataError, PairwiseJudgement
from alpaca_nb.llm import AuthenticationError, Endpoint, LLMError, ServerExitedError
from alpaca_nb.progress import progress_bar
from alpaca_nb.sft import instruction_text
from alpaca_nb.stats import WinRate, evenly_spaced, wilson_interval, win_rate

__all__ = [
    "Calibration",
    "JudgeRun",
    "JudgeUsability",
    "MIN_JUDGE_AGREEMENT",
    "PairVerdict",
    "calibrate",
    "calibration_pairs",
    "judge_endpoint",
    "judge_pairs",
    "judge_prompt",
    "judge_usability",
    "parse_choice",
    "reply_pairs",
    "verdict_records",
    "verdict_table",
    "verdict_win_rate",
]

JUDGE_MAX_TOKENS = 8
# Word boundaries on both sides: "output better" or "the output above" must not read as a choice.
_CHOICE = re.compile(r"\boutput\s*\(?\s*([ab])\b\s*\)?", re.IGNORECASE)


def judge_prompt() -> str:
    """Return the shipped pairwise prompt (``alpaca_nb/judge_template.txt``), with its three fields."""
    return (resources.files("alpaca_nb") / "judge_template.txt").read_text(encoding="utf-8")


def parse_choice(reply: str) -> str | None:
    """Return "a" or "b" from a judge's reply, or None when it names neither (or both)."""
    found = {match.lower() for match in _CHOICE.findall(reply)}
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class PairVerdict:
    """A judge's verdict on one pair, asked in both orders; preference as AlpacaEval's (1, 2, 0 = draw)."""

    instruction: str
    first_order: str | None  # "a", "b" or None: output_1 shown as (a)
    swapped_order: str | None  # output_2 shown as (a)

    @property
    def consistent(self) -> bool:
        """True when both orders name the same output (a judge without position bias)."""
        return self.first_order is not None and {"a": "b", "b": "a"}.get(self.first_order) == self.swapped_order

    @property
    def preference(self) -> int:
        """1 when output_1 wins in both orders, 2 when output_2 does, 0 (a tie) when the orders disagree."""
        if not self.consistent:
            return 0
        return 1 if self.first_order == "a" else 2


@dataclass
class JudgeRun:
    verdicts: list[PairVerdict | None]  # None: not judged (the budget or a failure stopped the run first)
    spent_usd: float
    stopped_reason: str | None = None


def _key(model: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps({"judge": model, "prompt": prompt}).encode()).hexdigest()


def _read_cache(path: Path | None) -> dict[str, str | None]:
    from alpaca_nb.jsonl import read_records

    if path is None:
        return {}
    cached = {}
    for number, record in read_records(path):
        if not isinstance(record.get("key"), str) or record.get("choice") not in ("a", "b", None):
            raise DataError(f"{path}, line {number}: not a judgement record; the file is unchanged: delete it to judge again")
        # The judge's words are kept, so a mended parser re-reads old judgements instead of trusting them.
        reply = record.get("reply")
        cached[record["key"]] = parse_choice(reply) if isinstance(reply, str) else record["choice"]
    return cached


def _prompts(pair: PairwiseJudgement, template: str) -> tuple[str, str]:
    def fill(a: str, b: str) -> str:
        return template.format(instruction=pair.instruction, output_a=a, output_b=b)

    return fill(pair.output_1, pair.output_2), fill(pair.output_2, pair.output_1)


def judge_pairs(endpoint: Endpoint, pairs: Sequence[PairwiseJudgement], ledger_path: str | os.PathLike,
                cache: str | os.PathLike | None = None, budget_usd: float | None = None, concurrency: int = 8,
                price_as: str | None = None) -> JudgeRun:
    """Ask ``endpoint`` to judge each pair in both orders; every call lands in the ledger as stage ``judge``.

    No call, and no retry, starts whose worst-case cost could pass ``budget_usd``; judged prompts are cached in
    ``cache`` (JSONL), so a rerun asks only what is missing. ``pairs`` are in AlpacaEval's format
    (``data.PairwiseJudgement``; its ``preference`` is ignored here). Ctrl-C (KeyboardInterrupt) stops the
    run at once: queued calls are cancelled, the calls in flight finish and are cached and ledgered, then the
    interrupt is raised again.
    """
    from alpaca_nb.jsonl import append_records

    ledger = Ledger(ledger_path, budget_usd=budget_usd, price_as=price_as)
    ledger.price_of(endpoint.model)  # an unpriced judge fails here, before any call
    template = judge_prompt()
    cache_path = Path(cache) if cache is not None else None
    known = _read_cache(cache_path)
    prompts = [prompt for pair in pairs for prompt in _prompts(pair, template)]
    missing = list(dict.fromkeys(p for p in prompts if _key(endpoint.model, p) not in known))
    previous_hook = endpoint.on_call

    def record(call: Any) -> None:
        ledger.record(call, stage="judge")
        if previous_hook is not None:
            previous_hook(call)

    endpoint.on_call = record
    stopped: list[str] = []

    def ask(prompt: str) -> None:
        if stopped:
            return
        # Every attempt, retries included, reserves this prompt's worst case (Endpoint.complete's budget).
        budget = ledger.call_budget(endpoint.model, count_tokens(prompt, ledger.price_as or endpoint.model),
                                    JUDGE_MAX_TOKENS)
        try:
            reply = endpoint.complete([{"role": "user", "content": prompt}], budget=budget,
                                      max_tokens=JUDGE_MAX_TOKENS, temperature=0.0)
        except BudgetExceeded as error:
            stopped.append(f"stopped before the budget could be exceeded: {error}")
            return
        except (AuthenticationError, ServerExitedError) as error:
            stopped.append(f"stopped: {error}")
            return
        except LLMError as error:
            stopped.append(f"stopped: a judge call failed after retries: {error}")
            return
        choice = parse_choice(reply.text)
        if cache_path is not None:
            append_records(cache_path, [{"key": _key(endpoint.model, prompt), "choice": choice, "reply": reply.text}])
        known[_key(endpoint.model, prompt)] = choice

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
    try:
        list(progress_bar(pool.map(ask, missing), total=len(missing), desc=f"judge {endpoint.model}", unit="call"))
    except KeyboardInterrupt:
        # Without this, leaving the pool would wait for every queued call: Ctrl-C would keep calling the judge.
        stopped.append("interrupted")  # a worker between two calls starts no other
        pool.shutdown(wait=True, cancel_futures=True)  # the calls in flight finish, and are cached and ledgered
        raise
    finally:
        pool.shutdown(wait=True)
        endpoint.on_call = previous_hook
    verdicts: list[PairVerdict | None] = []
    for pair in pairs:
        first, swapped = (_key(endpoint.model, p) for p in _prompts(pair, template))
        verdicts.append(PairVerdict(pair.instruction, known[first], known[swapped])
                        if first in known and swapped in known else None)
    return JudgeRun(verdicts, ledger.total_usd, stopped[0] if stopped else None)


def verdict_win_rate(verdicts: Sequence[PairVerdict | None]) -> WinRate:
    """Return output_2's win rate over output_1 from a judge's verdicts (inconsistent pairs are ties)."""
    judged = [v.preference for v in verdicts if v is not None]
    return win_rate(judged.count(2), judged.count(1), judged.count(0))


@dataclass(frozen=True)
class Calibration:
    """How far a judge can be trusted: agreement with GPT-4 and consistency under swapped order (95 % Wilson)."""

    pairs: int  # judged pairs on which GPT-4 was decisive
    agreement: float  # the judge's verdict equals GPT-4's (a tie counts as disagreement)
    agreement_ci: tuple[float, float]
    contradictions: float  # the two orders named different outputs (or no output)
    contradictions_ci: tuple[float, float]
    first_position: float  # share of all answers that named output (a), the position shown first


def calibrate(verdicts: Sequence[PairVerdict | None], reference: Sequence[PairwiseJudgement]) -> Calibration:
    """Compare a judge's verdicts with GPT-4's on the same AlpacaEval pairs (``reference``, same order)."""
    if len(verdicts) != len(reference):
        raise ValueError(f"{len(verdicts)} verdicts for {len(reference)} reference judgements")
    both = [(v, r) for v, r in zip(verdicts, reference) if v is not None and r.preference in (1.0, 2.0)]
    if not both:
        raise ValueError("no pair was judged on which the reference judge was decisive")
    agree = sum(v.preference == int(r.preference) for v, r in both)
    contradict = sum(not v.consistent for v, _ in both)
    answers = [choice for v, _ in both for choice in (v.first_order, v.swapped_order) if choice is not None]
    return Calibration(len(both), agree / len(both), wilson_interval(agree, len(both)), contradict / len(both),
                       wilson_interval(contradict, len(both)), answers.count("a") / len(answers) if answers else 0.0)


# A floor, not a seal of quality. AlpacaEval's table of evaluators (src/alpaca_eval/configs/README.md) puts
# human annotators' agreement with each other at 65.7 % and GPT-4's with humans at 66.6 %; a judge far below
# that measures its own noise, and its win rate must not stand beside the release's human one.
MIN_JUDGE_AGREEMENT = 0.60


@dataclass(frozen=True)
class JudgeUsability:
    """Whether a judge's win rates may be reported, and why, in a sentence a reader can check."""

    usable: bool
    reason: str


def judge_usability(calibration: Calibration | None, threshold: float = MIN_JUDGE_AGREEMENT) -> JudgeUsability:
    """Return whether a judge agrees with GPT-4 at least ``threshold`` of the time on its calibration pairs."""
    if calibration is None:
        return JudgeUsability(False, "not usable: no calibration pair was judged, so its agreement is unknown")
    low, high = calibration.agreement_ci
    measured = (f"agrees with GPT-4 on {calibration.agreement:.0%} of {calibration.pairs} pairs "
                f"(95 % {low:.0%} to {high:.0%})")
    if calibration.agreement >= threshold:
        return JudgeUsability(True, f"usable: {measured}, at or above the {threshold:.0%} floor")
    return JudgeUsability(False, f"not usable: {measured}, below the {threshold:.0%} floor; its win rates are not "
                                 "reported")


def verdict_records(verdicts: Sequence[PairVerdict | None]) -> list[dict[str, Any]]:
    """Return the verdicts as plain records (for a results file), None for an unjudged pair."""
    return [None if v is None else {**asdict(v), "preference": v.preference} for v in verdicts]


@contextlib.contextmanager
def judge_endpoint(profile: Any) -> Iterator[Endpoint]:
    """Yield the profile's judge: the embedded llama.cpp server on a laptop, the named API (gpt-4o-mini) on a cluster."""
    from alpaca_nb.llm import local_server

    if profile.judge_base_url is not None:
        yield Endpoint(profile.judge_base_url, profile.judge_model, api="chat", timeout=120)
        return
    with local_server() as server:
        yield Endpoint(server.base_url, server.model, api="chat", timeout=600)


def calibration_pairs(annotations: Sequence[PairwiseJudgement], count: int,
                      max_characters: int = 3000) -> list[PairwiseJudgement]:
    """Return ``count`` evenly spaced pairs on which GPT-4 was decisive and whose prompt fits a small context.

    ``max_characters`` bounds instruction plus both answers, so every prompt fits the embedded server's
    2,048-token slot; the chapter says so, because it leaves out AlpacaEval's longest answers.
    """
    usable = [a for a in annotations if a.preference in (1.0, 2.0)
              and len(a.instruction) + len(a.output_1) + len(a.output_2) <= max_characters]
    return evenly_spaced(usable, count)


def reply_pairs(reference: Sequence[Any], replies: Sequence[Any], reference_name: str,
                system_name: str) -> list[PairwiseJudgement]:
    """Return AlpacaEval-format pairs: the reference answer as output_1, the system's reply as output_2."""
    return [PairwiseJudgement(instruction_text(answer.instruction, answer.input), answer.output, reply.output,
                              reference_name, system_name, None)
            for answer, reply in zip(reference, replies, strict=True)]


def verdict_table(runs: dict[str, JudgeRun], usability: JudgeUsability | None = None) -> "pd.DataFrame":
    """Return each system's judged win rate over the reference, with its interval and sign test.

    With a ``usability`` that says the judge is not usable, the counts stay and the rate, its interval and
    the test are None: a reader sees the verdicts without a win rate that would mislead.
    """
    import pandas as pd

    rows = []
    for system, run in runs.items():
        result = verdict_win_rate(run.verdicts)
        rows.append({"system": system, "wins": result.wins, "losses": result.losses, "ties (incl. inconsistent)": result.ties,
                     "win rate": result.rate, "95% low": result.ci_low, "95% high": result.ci_high,
                     "sign-test p": result.p_value, "unjudged": sum(v is None for v in run.verdicts)})
        if usability is not None and not usability.usable:
            rows[-1].update({"win rate": None, "95% low": None, "95% high": None, "sign-test p": None})
    return pd.DataFrame(rows).set_index("system")
