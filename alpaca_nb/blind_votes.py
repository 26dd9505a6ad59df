"""Chapter 5's blind pairwise vote, as the paper ran it: pairs of answers shown in a random order without their
systems' names, the votes a reader records (appended, never rewritten), their tally and the raters' agreement.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from alpaca_nb.data import DataError
from alpaca_nb.stats import WinRate, fleiss_kappa, win_rate

__all__ = [
    "Agreement", "BlindPair", "Vote", "blind_pairs", "next_pair", "rater_agreement", "read_votes", "record_vote",
    "tally", "votes_file",
]

CHOICES = ("A", "B", "tie", "skip")


@dataclass(frozen=True)
class BlindPair:
    """One item as a rater sees it: two answers in a random order, the systems hidden behind A and B."""

    item: str
    instruction: str
    input: str
    answer_a: str
    answer_b: str
    system_a: str
    system_b: str


@dataclass(frozen=True)
class Vote:
    rater: str
    item: str
    choice: str  # "A", "B", "tie" or "skip"
    system_a: str
    system_b: str

    @property
    def winner(self) -> str | None:
        """The system the rater preferred; "tie" for a tie; None for a skip."""
        return {"A": self.system_a, "B": self.system_b, "tie": "tie"}.get(self.choice)


def blind_pairs(rater: str, items: Sequence[Any], first: Sequence[str], second: Sequence[str],
                names: tuple[str, str], seed: int = 0) -> list[BlindPair]:
    """Return one blind pair per item (objects with ``id``, ``instruction``, ``input``) for ``rater``.

    ``first`` and ``second`` are the two systems' answers, named ``names``. Which answer is A is drawn
    per item from a generator seeded by (seed, rater): the same rater always sees the same order.
    """
    import random

    if not (len(items) == len(first) == len(second)):
        raise ValueError(f"{len(items)} items, {len(first)} and {len(second)} answers: one answer each per item")
    draw = random.Random(f"{seed}:{rater}")
    pairs = []
    for item, one, two in zip(items, first, second):
        swap = draw.random() < 0.5
        (answer_a, system_a), (answer_b, system_b) = ((two, names[1]), (one, names[0])) if swap else \
            ((one, names[0]), (two, names[1]))
        pairs.append(BlindPair(item.id, item.instruction, item.input, answer_a, answer_b, system_a, system_b))
    return pairs


def votes_file(profile: Any) -> Path:
    """Return the JSONL file where chapter 5 keeps the profile's blind votes: in the profile's run folder, beside
    the recipe and never inside a stage folder, so rerunning the evaluate stage (a new fine-tune, a changed
    setting) cannot delete what people voted."""
    return profile.run_dir("votes") / "votes.jsonl"


def record_vote(path: str | os.PathLike, rater: str, pair: BlindPair, choice: str) -> Vote:
    """Append one vote to the votes JSONL file (one whole line, synced: a kill never leaves half a vote)."""
    from alpaca_nb.jsonl import append_records

    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
    if not rater.strip():
        raise ValueError("a vote needs the rater's name")
    vote = Vote(rater.strip(), pair.item, choice, pair.system_a, pair.system_b)
    append_records(Path(path), [asdict(vote)])
    return vote


def read_votes(path: str | os.PathLike) -> list[Vote]:
    """Return the votes in ``path`` (none if it does not exist); a torn last line is dropped, other damage refused."""
    from alpaca_nb.jsonl import read_records

    votes = []
    for number, record in read_records(Path(path)):
        where = f"{path}, line {number}"
        for name in ("rater", "item", "choice", "system_a", "system_b"):
            if not isinstance(record.get(name), str):
                raise DataError(f"{where}, field {name!r}: missing or not a string; the file is unchanged")
        if record["choice"] not in CHOICES:
            raise DataError(f"{where}, field 'choice': {record['choice']!r} is not one of {CHOICES}")
        votes.append(Vote(**{name: record[name] for name in ("rater", "item", "choice", "system_a", "system_b")}))
    return votes


def next_pair(pairs: Sequence[BlindPair], votes: Sequence[Vote], rater: str) -> BlindPair | None:
    """Return the first pair ``rater`` has not voted on (a skip counts as seen), or None when all are done."""
    seen = {vote.item for vote in votes if vote.rater == rater.strip()}
    return next((pair for pair in pairs if pair.item not in seen), None)


def tally(votes: Sequence[Vote], system: str, other: str) -> WinRate:
    """Return ``system``'s win rate against ``other`` over every rater's votes (ties one half, skips left out)."""
    counted = [vote.winner for vote in votes if vote.winner is not None]
    return win_rate(counted.count(system), counted.count(other), counted.count("tie"))


@dataclass(frozen=True)
class Agreement:
    statistic: str  # "Cohen's kappa" (two raters) or "Fleiss' kappa" (more)
    kappa: float
    raters: int
    items: int  # items every one of those raters judged (skips left out)


def rater_agreement(votes: Sequence[Vote]) -> Agreement | None:
    """Return the raters' agreement on the items they all judged, or None with fewer than two raters or items.

    Labels are the preferred system or "tie". Cohen's kappa for two raters, Fleiss' kappa for more.
    """
    labels: dict[str, dict[str, str]] = {}
    for vote in votes:  # a rater's last vote on an item counts
        if vote.winner is not None:
            labels.setdefault(vote.rater, {})[vote.item] = vote.winner
    raters = sorted(labels)
    if len(raters) < 2:
        return None
    shared = sorted(set.intersection(*(set(labels[rater]) for rater in raters)))
    if len(shared) < 2:
        return None
    table = [[labels[rater][item] for rater in raters] for item in shared]
    if len(raters) == 2:
        from sklearn.metrics import cohen_kappa_score

        kappa = float(cohen_kappa_score([row[0] for row in table], [row[1] for row in table]))
        return Agreement("Cohen's kappa", kappa, 2, len(shared))
    return Agreement("Fleiss' kappa", fleiss_kappa(table), len(raters), len(shared))
