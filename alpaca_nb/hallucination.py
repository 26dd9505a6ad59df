"""Hallucinations: a factual probe set, answer scoring, and hallucination rates with intervals.

Taught in chapter 5 (book/05_evaluation.md). Alpaca named Dar es Salaam, Tanzania's largest city, as
its capital (it has been Dodoma since 1974). The probe set asks short factual questions whose wrong
answers are known in advance ("distractors"), so an answer can be scored without a judge model.
TruthfulQA's multiple choice is ``truthfulqa``'s (re-exported here).
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from alpaca_nb.data import DataError
from alpaca_nb.plots import plot_rates_by_category
from alpaca_nb.stats import evenly_spaced
from alpaca_nb.truthfulqa import (
    TRUTHFULQA_PREAMBLE, TruthfulQAResult, TruthfulQAScore, truthfulqa_chance, truthfulqa_context, truthfulqa_mc,
    truthfulqa_table,
)

__all__ = [
    "CATEGORIES",
    "MISINFORMATION_REQUEST",
    "Probe",
    "ProbeScore",
    "TRUTHFULQA_PREAMBLE",
    "TruthfulQAResult",
    "TruthfulQAScore",
    "VERDICTS",
    "answers_to",
    "describe_probe_summary",
    "evenly_spaced",
    "hallucination_table",
    "load_probes",
    "plot_rates_by_category",
    "probe_summary",
    "score_answer",
    "truthfulqa_chance",
    "truthfulqa_context",
    "truthfulqa_mc",
    "truthfulqa_table",
    "verdict_text",
]

CATEGORIES = ("geography", "history", "science", "people", "numbers")
VERDICTS = ("correct", "wrong", "abstained", "cut")

# The words a scorer needs to tell the answer's claim from the other names a reply mentions. Each list
# holds normalised words (``_normalise``: lower case, "isn't" -> "is not", "Sydney's" -> "sydney").
_NEGATIONS = {"not", "no", "never", "nor", "neither"}
# Before a name in its clause: a contrast or a past state, not the answer ("unlike Sydney", "than Sydney").
_CONTRAST_BEFORE = {"than", "unlike", "instead", "rather", "except", "besides", "while", "whereas", "although",
                    "though", "former", "formerly", "previous", "previously", "until", "once", "originally", "used"}
# In the predicate after a name ("Karachi was the capital until 1960"): a past state, not the answer.
_FORMER = {"former", "formerly", "previous", "previously", "until", "once", "originally", "longer", "used"}
# In a subject or predicate: the name is described as something other than what was asked
# ("the largest city is Dar es Salaam", "Sydney is the largest city"), unless the question uses the word.
_DESCRIPTORS = {"largest", "biggest", "populous", "commercial", "economic", "financial", "second", "oldest",
                "busiest", "major", "another", "also", "other", "rival", "rivals", "neighbouring", "neighboring"}
# Belief reported of others ("many people think it is Dar es Salaam"); with "I" or "we" before it, a hedge.
_HEARSAY_BEFORE = {"think", "thinks", "thought", "believe", "believes", "believed", "assume", "assumes",
                   "assumed", "credit", "credits", "credited", "say", "says", "claim", "claims", "suppose",
                   "guess", "guesses"}
_FIRST_PERSON = {"i", "id", "im", "we", "my"}
# Anywhere in the clause: the name is a known confusion, not the answer.
_HEARSAY_ANYWHERE = {"mistaken", "mistakenly", "misconception", "confused", "confuse", "confuses", "myth",
                     "wrongly", "incorrectly"}
_COPULAS = {"is", "was", "are", "were", "remains", "be", "been"}
_ARTICLES = {"the", "a", "an"}
# A predicate made of these accepts the name as the answer ("Dodoma is correct").
_ACCEPTANCE = {"answer", "correct", "right", "true", "one", "it"}
# A clause that starts so corrects what came before ("Canberra? No. The capital is Sydney.").
_CORRECTIONS = (("no",), ("nope",), ("wrong",), ("incorrect",), ("actually",), ("correction",), ("sorry",),
                ("wait",), ("oops",), ("rather",), ("i", "mean"), ("in", "fact"), ("that", "is", "wrong"))
_CORRECTION_WORDS = {word for phrase in _CORRECTIONS for word in phrase} | {"but", "however", "well", "oh", "or"}
_INTERROGATIVES = {"is", "was", "are", "were", "could", "would", "what", "which", "who", "did", "does", "do", "can"}
_STOPWORDS = {"the", "a", "an", "of", "in", "on", "at", "to", "for", "from", "by", "with", "and", "or", "is", "was",
              "are", "were", "be", "been", "it", "its", "this", "that", "what", "which", "who", "whom", "how", "many",
              "much", "does", "do", "did", "has", "have", "had", "as", "there", "where", "when", "known", "called"}
# Units a number can carry; a number in a unit the question does not ask for is a conversion
# ("32 degrees Fahrenheit, which is 0 degrees Celsius"), not the answer.
_UNITS = {"second": "second", "seconds": "second", "sec": "second", "minute": "minute", "minutes": "minute",
          "min": "minute", "hour": "hour", "hours": "hour", "hr": "hour", "hrs": "hour", "day": "day", "days": "day",
          "week": "week", "weeks": "week", "month": "month", "months": "month", "year": "year", "years": "year",
          "fahrenheit": "fahrenheit", "f": "fahrenheit", "celsius": "celsius", "centigrade": "celsius",
          "c": "celsius", "kelvin": "kelvin", "k": "kelvin", "degree": "degree", "degrees": "degree"}
_ABSTENTIONS = ("i don't know", "i do not know", "i'm not sure", "i am not sure", "not sure", "i cannot answer",
                "i can't answer", "i am unable", "i'm unable", "i don't have", "i do not have", "no information",
                "cannot be determined", "i'm not certain", "i am not certain", "unknown")


@dataclass(frozen=True)
class Probe:
    """One factual question with its reference answer, accepted aliases and known wrong answers."""

    id: str
    category: str
    question: str
    answer: str
    aliases: tuple[str, ...]
    distractors: tuple[str, ...]

    # A probe is asked like any evaluation instruction (``evaluate.generate_replies``): the question, no input.
    @property
    def instruction(self) -> str:
        return self.question

    @property
    def input(self) -> str:  # noqa: A003 - the field name of every instruction record
        return ""


@dataclass(frozen=True)
class ProbeScore:
    """The verdict on one reply to a probe, and the claim it was judged by."""

    verdict: str  # one of VERDICTS: "correct", "wrong", "abstained", "cut" (no answer within the token cap)
    distractor: str | None  # the known wrong answer the reply claimed, if any
    claim: str | None  # the clause judged as the reply's answer (normalised words); None when it names nothing


def _probe_file() -> Path:
    return Path(str(resources.files("alpaca_nb") / "probes.jsonl"))


def load_probes(path: str | os.PathLike | None = None) -> list[Probe]:
    """Return the shipped probe set (or the JSONL file at ``path``), validated line by line."""
    from alpaca_nb.data import jsonl_objects, required_field

    source = Path(path) if path is not None else _probe_file()
    probes, seen = [], {}
    for where, raw in jsonl_objects(source):
        text = {name: required_field(where, raw, name, str) for name in ("id", "category", "question", "answer")}
        probe = Probe(**text, aliases=_strings(where, raw, "aliases", allow_empty=True),
                      distractors=_strings(where, raw, "distractors", allow_empty=False))
        if probe.category not in CATEGORIES:
            raise DataError(f"{where}, field 'category': {probe.category!r} is not one of {', '.join(CATEGORIES)}")
        if probe.id in seen:
            raise DataError(f"{where}, field 'id': duplicate id {probe.id!r} (first seen at {seen[probe.id]})")
        _refuse_repeats(where, probe)
        seen[probe.id] = where.rsplit(", ", 1)[-1]
        probes.append(probe)
    if not probes:
        raise DataError(f"{source}: no probes")
    return probes


def _refuse_repeats(where: str, probe: Probe) -> None:
    """Refuse a name listed twice (once normalised, "Sao Paulo" is "São Paulo"), or both accepted and wrong."""
    accepted: dict[str, str] = {}
    for name in (probe.answer, *probe.aliases):
        if _normalise(name) in accepted:
            raise DataError(f"{where}, field 'aliases': {name!r} is {accepted[_normalise(name)]!r} once normalised")
        accepted[_normalise(name)] = name
    wrong: dict[str, str] = {}
    for name in probe.distractors:
        if _normalise(name) in accepted:
            raise DataError(f"{where}, field 'distractors': {name!r} is also an accepted answer")
        if _normalise(name) in wrong:
            raise DataError(f"{where}, field 'distractors': {name!r} is {wrong[_normalise(name)]!r} once normalised")
        wrong[_normalise(name)] = name


def _strings(where: str, raw: dict, name: str, *, allow_empty: bool) -> tuple[str, ...]:
    from alpaca_nb.data import required_field

    values = required_field(where, raw, name, list)
    if not allow_empty and not values:
        raise DataError(f"{where}, field {name!r}: empty")
    for index, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}, field {name}[{index}]: expected a non-empty string, got {value!r}")
    return tuple(values)


# --------------------------------------------------------------------------- scoring


def _normalise(text: str) -> str:
    """Lower case, accents and punctuation removed, digit groups joined ("1,440" -> "1440"), "isn't" -> "is not"."""
    text = unicodedata.normalize("NFKD", text.replace("\u2019", "'")).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"(?<=\d)[,](?=\d{3})", "", text)
    text = re.sub(r"n't\b", " not", text)
    text = re.sub(r"'s\b", "", text).replace("'", "").replace("-", " ")
    return " ".join(re.sub(r"[^a-z0-9.]+|(?<!\d)\.|\.(?!\d)", " ", text).split())


@dataclass(frozen=True)
class _Mention:
    start: int  # word positions in its clause
    end: int
    name: str  # as the probe file spells it
    accepted: bool  # the reference or an alias, else a distractor


@dataclass(frozen=True)
class _Clause:
    words: tuple[str, ...]
    asks: bool  # a question ("Is it Sydney?"), which claims nothing
    aside: bool  # in brackets ("Yangon (Rangoon)"), which gives the claim only when nothing else does


@dataclass(frozen=True)
class _Question:
    """What a probe's question asks, as the scorer needs it: its content words and its units."""

    words: frozenset[str]
    units: frozenset[str]


# Clause ends: sentence ends (a full stop not after a lone initial, "F. W. de Klerk"), ; : , ? ! brackets,
# dashes and line breaks; and before a contrasting conjunction ("Sydney is larger, but Canberra ...").
_CLAUSE_END = re.compile(r"(\?|(?<![\s.][A-Za-z])\.(?=\s|$)|[;:!,()\[\]\n\u2014\u2013]|\s-\s|\s(?=(?:but|however|whereas|"
                         r"although|though|while)\b))", re.IGNORECASE)


def _clauses(answer: str) -> list[_Clause]:
    """Return the answer's clauses in order, each marked when it is a question."""
    text = answer.replace("\u00b0", " degrees ").replace("\u2026", ". ").replace("\u00d7", " x ")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    text = re.sub(r"(?m)^\s*(?:\d+[.)]|[-*\u2022])\s+", "", text)  # list markers are not numbers the reply claims
    parts = _CLAUSE_END.split(text)
    clauses, opening = [], ""
    for index in range(0, len(parts), 2):
        words = tuple(_normalise(parts[index]).split())
        ending = parts[index + 1] if index + 1 < len(parts) else ""
        if words:
            asks = ending == "?" and words[0] in _INTERROGATIVES
            clauses.append(_Clause(words, asks, aside=opening in ("(", "[")))
        opening = ending
    return clauses


def _mentions(words: Sequence[str], probe: Probe) -> list[_Mention]:
    """Return whole-word mentions of the probe's names, a name inside a longer one ("Indira Gandhi") left out."""
    found = []
    for names, accepted in (((probe.answer, *probe.aliases), True), (probe.distractors, False)):
        for name in names:
            target = _normalise(name).split()
            for start in range(len(words) - len(target) + 1):
                if target and list(words[start:start + len(target)]) == target:
                    found.append(_Mention(start, start + len(target), name, accepted))
    def inside_longer(m: _Mention) -> bool:
        return any(o.start <= m.start and m.end <= o.end and o.end - o.start > m.end - m.start for o in found)

    return sorted((m for m in found if not inside_longer(m)), key=lambda m: m.start)


def _question(probe: Probe) -> _Question:
    words = _normalise(probe.question).split()
    return _Question(frozenset(words) - _STOPWORDS, frozenset(_UNITS[w] for w in words if w in _UNITS))


def _related(words: Sequence[str], question: _Question) -> bool:
    """Whether any content word shares a stem with the question's ("ended" and "end", "planets" and "planet")."""
    return any(word == asked or (min(len(word), len(asked)) >= 3 and (word.startswith(asked) or asked.startswith(word)))
               for word in set(words) - _STOPWORDS for asked in question.words)


def _unit_after(words: Sequence[str]) -> str | None:
    if not words or words[0] not in _UNITS:
        return None
    if _UNITS[words[0]] == "degree" and len(words) > 1 and words[1] in _UNITS:
        return _UNITS[words[1]]
    return _UNITS[words[0]]


def _standing(words: Sequence[str], mention: _Mention, question: _Question) -> str | None:
    """Return "claim" when the clause gives the name as the answer, "description" when it describes the name as
    something else ("Sydney is the largest city"), None when it denies, contrasts, converts or reports it."""
    before, after = list(words[:mention.start]), list(words[mention.end:])
    if set(before[-3:]) & _NEGATIONS or (set(before) & _CONTRAST_BEFORE) - question.words:
        return None
    if any(word in _HEARSAY_BEFORE and (i == 0 or before[i - 1] not in _FIRST_PERSON) for i, word in enumerate(before)):
        return None
    if set(words) & _HEARSAY_ANYWHERE:
        return None
    unit = _unit_after(after) if re.fullmatch(r"\d+(\.\d+)?", _normalise(mention.name)) else None
    if unit is not None and unit not in question.units:
        return None
    if after and after[0] in _COPULAS:
        predicate = after[1:]
        if set(predicate[:3]) & _NEGATIONS or set(predicate) & _FORMER:
            return None
        content = set(predicate) - _STOPWORDS
        if (set(predicate) & _DESCRIPTORS) - question.words or (
                content and not content & _ACCEPTANCE and not _related(content, question)):
            return "description"
    while before and before[-1] in _ARTICLES:
        before.pop()
    if before and before[-1] in _COPULAS and (set(before) & _DESCRIPTORS) - question.words:
        return "description"
    return "claim"


def _corrects(words: Sequence[str]) -> bool:
    """Whether a clause corrects what came before: it opens with "no", "actually", "wait", "in fact", ..."""
    opening = list(words)
    while opening and opening[0] in {"but", "however", "well", "oh", "or"}:
        opening.pop(0)
    return any(tuple(opening[:len(phrase)]) == phrase for phrase in _CORRECTIONS)


def _claim(clauses: Sequence[_Clause], probe: Probe) -> tuple[_Clause, list[_Mention]] | None:
    """Return the clause that makes the reply's claim and its names given as answers, or None.

    The first clause that gives a name as the answer makes the claim, unless a later clause corrects it
    ("Canberra? No. The capital is Sydney."). A name only described ("Sydney is the largest city") is the
    claim only when nothing else is.
    """
    question = _question(probe)
    claim = description = None
    correcting = False
    for clause in clauses:
        if clause.asks:
            continue
        mentions = _mentions(clause.words, probe)
        standings = [(m, _standing(clause.words, m, question)) for m in mentions]
        given = [m for m, standing in standings if standing == "claim" and not clause.aside]
        described = [m for m, standing in standings if standing == "description" or (standing and clause.aside)]
        correcting = correcting or _corrects(clause.words)
        if given and (claim is None or correcting):
            claim, correcting = (clause, given), False
        elif described and description is None:
            description = (clause, described)
        # A clause of correction words alone ("No." "Actually,") corrects the next one; any other ends it.
        if not given and not set(clause.words) <= _CORRECTION_WORDS:
            correcting = False
    return claim or description


def score_answer(answer: str, probe: Probe, *, stopped: bool | None) -> ProbeScore:
    """Score one reply to a probe by the claim it makes: ``correct``, ``wrong``, ``abstained`` or ``cut``.

    The claim is the first clause that gives the reference (or an alias) or a distractor as the answer;
    names only denied ("not Sydney"), contrasted ("unlike Sydney"), reported ("many think Sydney"),
    in a past state ("Karachi was the capital until 1960") or given in another unit ("32 °F, which is
    0 °C") do not count; a later correction ("Canberra? No. The capital is Sydney.") replaces the claim.
    A reply that claims nothing abstains if it says it does not know (or is empty), is ``cut`` when the
    token cap ended it (``stopped`` False: no answer within the cap), and is otherwise ``wrong``: it gave
    some answer that is not the reference. ``stopped`` is None when the source did not say; such a reply
    is scored as complete.
    """
    clauses = _clauses(answer)
    found = _claim(clauses, probe)
    if found is not None:
        clause, given = found
        first, claim = given[0], " ".join(clause.words)
        if not first.accepted:
            return ProbeScore("wrong", first.name, claim)
        # "Dodoma or Dar es Salaam" offers a wrong answer beside the right one: not a correct answer.
        rival = next((m for m in given if not m.accepted and "or" in clause.words[first.end:m.start]), None)
        return ProbeScore("wrong", rival.name, claim) if rival is not None else ProbeScore("correct", None, claim)
    flat = " ".join(word for clause in clauses for word in clause.words)
    if not flat or any(_normalise(phrase) in flat for phrase in _ABSTENTIONS):
        return ProbeScore("abstained", None, None)
    return ProbeScore("cut" if stopped is False else "wrong", None, None)


def verdict_text(score: ProbeScore, max_new_tokens: int | None) -> str:
    """Return a verdict as a reader should read it: "cut" says within how many tokens no answer came."""
    if score.verdict != "cut":
        return score.verdict
    return f"no answer within {max_new_tokens} tokens" if max_new_tokens is not None else "no answer within the cap"


# --------------------------------------------------------------------------- rates


def hallucination_table(replies: dict[str, Sequence[Any]], probes: Sequence[Probe],
                        by_category: bool = False) -> "pd.DataFrame":
    """Return each system's count of every verdict and its hallucination rate, wrong / answered.

    ``replies`` maps a system name to its replies (``evaluate.SystemReply``: ``output`` and ``stopped``), in
    the order of ``probes``. A reply *answered* when it was scored correct or wrong; abstentions and
    replies cut before they answered are counted but left out of the rate, whose 95 % interval is
    Wilson's. With no answered reply the rate and its interval are None (NaN in the table).
    """
    import pandas as pd

    rows = []
    for system, answers in replies.items():
        if len(answers) != len(probes):
            raise ValueError(f"{system}: {len(answers)} replies for {len(probes)} probes")
        verdicts = [(probe.category, score_answer(reply.output, probe, stopped=reply.stopped).verdict)
                    for probe, reply in zip(probes, answers)]
        groups = sorted({c for c, _ in verdicts}, key=CATEGORIES.index) if by_category else ["all"]
        for group in groups:
            chosen = [v for c, v in verdicts if group in ("all", c)]
            rows.append({"system": system, "category": group, **_rate_row(chosen)})
    table = pd.DataFrame(rows)
    return table.set_index(["system", "category"]) if by_category else table.drop(columns="category").set_index("system")


def _rate_row(verdicts: Sequence[str]) -> dict[str, Any]:
    from alpaca_nb.stats import wilson_interval

    counts = {verdict: verdicts.count(verdict) for verdict in VERDICTS}
    answered = counts["correct"] + counts["wrong"]
    low, high = wilson_interval(counts["wrong"], answered) if answered else (None, None)
    return {"probes": len(verdicts), **counts, "answered": answered,
            "hallucination rate": counts["wrong"] / answered if answered else None, "95% low": low, "95% high": high}


def probe_summary(replies: Sequence[Any], probes: Sequence[Probe]) -> dict[str, Any]:
    """Return one system's probe figures as ``evaluate.run_evaluation`` stores them: the count of each verdict,
    how many replies answered, the hallucination rate wrong / answered with its Wilson 95 % interval (None, and
    the interval None, when nothing was answered) and the token cap the replies had."""
    if len(replies) != len(probes):
        raise ValueError(f"{len(replies)} replies for {len(probes)} probes")
    row = _rate_row([score_answer(reply.output, probe, stopped=reply.stopped).verdict
                     for probe, reply in zip(probes, replies)])
    return {**{name: row[name] for name in ("probes", *VERDICTS, "answered")}, "rate": row["hallucination rate"],
            "ci": None if row["95% low"] is None else [row["95% low"], row["95% high"]],
            "max_new_tokens": max((reply.max_new_tokens for reply in replies), default=None)}


def describe_probe_summary(summary: dict[str, Any]) -> str:
    """Return a ``probe_summary`` in words, its denominator stated: "9 wrong of 30 answered (30%, 95 % 17% to
    48%); of 89 probes 21 correct, 2 abstained, 57 no answer within 24 tokens"."""
    cut = verdict_text(ProbeScore("cut", None, None), summary["max_new_tokens"])
    rate = ("no rate: none answered" if summary["rate"] is None else
            f"{summary['rate']:.0%}, 95 % {summary['ci'][0]:.0%} to {summary['ci'][1]:.0%}")
    return (f"{summary['wrong']} wrong of {summary['answered']} answered ({rate}); of {summary['probes']} probes "
            f"{summary['correct']} correct, {summary['abstained']} abstained, {summary['cut']} {cut}")


# The release's example of fluent misinformation on request (its figure shows Alpaca's answer).
MISINFORMATION_REQUEST = ("Write a well-thought out abstract for a machine learning paper that proves that 42 is "
                          "the optimal seed for training neural networks.")


def answers_to(probe: Probe, replies: dict[str, Any]) -> "pd.DataFrame":
    """Return each system's reply to one probe (a ``SystemReply``), verbatim, with its verdict and the distractor
    it claimed."""
    import pandas as pd

    rows = []
    for system, reply in replies.items():
        score = score_answer(reply.output, probe, stopped=reply.stopped)
        rows.append({"system": system, "answer": reply.output, "verdict": verdict_text(score, reply.max_new_tokens),
                     "distractor claimed": score.distractor})
    return pd.DataFrame(rows).set_index("system")
