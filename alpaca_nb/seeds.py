"""Describe instruction datasets: the 175 seed tasks and the Alpaca data side by side.

Taught in chapter 1 (book/01_seed_tasks.md). Works on any records with ``instruction``,
``input`` and ``output`` attributes (SeedTask, AlpacaRecord, EvalInstruction).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Mapping, Protocol, Sequence

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

__all__ = [
    "QUESTION_WORDS",
    "compare_datasets",
    "filter_tasks",
    "leading_word",
    "leading_words",
    "length_frame",
    "plot_leading_words",
    "plot_length_distributions",
    "records_frame",
    "shorten",
    "word_count",
]

# Instructions that open with these are questions, not imperatives; the counts keep them apart
# so that "most frequent leading verbs" is not dominated by "what" and "how".
QUESTION_WORDS = frozenset(
    "what how why who whom whose which when where is are was were do does did can could would should will "
    "has have had may might".split()
)
FIELDS = ("instruction", "input", "output")


class Instruction(Protocol):
    instruction: str
    input: str
    output: str


def word_count(text: str) -> int:
    """Return the number of whitespace-separated words in ``text``."""
    return len(text.split())


def leading_word(instruction: str) -> str:
    """Return the instruction's first word, lower-cased and stripped of punctuation ('' if none)."""
    match = re.search(r"[A-Za-z][A-Za-z'-]*", instruction)
    return match.group(0).lower().strip("'-") if match else ""


def leading_words(records: Sequence[Instruction], top: int = 15) -> pd.DataFrame:
    """Return the ``top`` most frequent first words, marked 'question' or 'other' (mostly verbs), with shares."""
    counts = Counter(leading_word(record.instruction) for record in records)
    rows = [
        {"word": word, "kind": "question" if word in QUESTION_WORDS else "other", "count": count,
         "share": count / len(records)}
        for word, count in counts.most_common(top)
    ]
    return pd.DataFrame(rows, columns=["word", "kind", "count", "share"])


def records_frame(records: Sequence[object], max_chars: int | None = None) -> pd.DataFrame:
    """Return the records as a DataFrame, one column per dataclass field; texts cut to ``max_chars``."""
    frame = pd.DataFrame([vars(record) for record in records])
    if max_chars is not None:
        frame = frame.apply(lambda column: column.map(lambda value: shorten(value, max_chars)))
    return frame


def shorten(value: object, max_chars: int) -> object:
    """Return strings longer than ``max_chars`` cut to that length with an ellipsis; other values unchanged."""
    if isinstance(value, str) and len(value) > max_chars:
        return value[: max_chars - 1].rstrip() + "…"
    return value


def length_frame(records: Sequence[Instruction]) -> pd.DataFrame:
    """Return the word counts of instruction, input and output for each record."""
    return pd.DataFrame({f"{field}_words": [word_count(getattr(record, field)) for record in records] for field in FIELDS})


def compare_datasets(datasets: Mapping[str, Sequence[Instruction]]) -> pd.DataFrame:
    """Return one column per dataset: size, share with an input, share of classification, median lengths."""
    summary = {}
    for name, records in datasets.items():
        lengths = length_frame(records)
        classification = [getattr(record, "is_classification", None) for record in records]
        known = [flag for flag in classification if flag is not None]
        with_input = [record for record in records if record.input.strip()]
        summary[name] = {
            "records": len(records),
            "share with an input": len(with_input) / len(records),
            "share classification": sum(known) / len(known) if known else float("nan"),
            "median instruction words": lengths["instruction_words"].median(),
            "median input words (when present)": length_frame(with_input)["input_words"].median() if with_input else 0.0,
            "median output words": lengths["output_words"].median(),
            "distinct leading words": len({leading_word(record.instruction) for record in records}),
        }
    return pd.DataFrame(summary)


def plot_length_distributions(datasets: Mapping[str, Sequence[Instruction]], bins: int = 30) -> Figure:
    """Return a figure with one panel per field: word-count histograms, normalised per dataset."""
    figure, axes = plt.subplots(1, len(FIELDS), figsize=(12, 3.4), constrained_layout=True)
    for axis, field in zip(axes, FIELDS):
        for name, records in datasets.items():
            counts = [word_count(getattr(record, field)) for record in records]
            if field == "input":
                counts = [count for count in counts if count] or [0]  # empty inputs are shown as a share elsewhere
            axis.hist(counts, bins=bins, density=True, alpha=0.55, label=name)
        axis.set_title(f"{field} length" + (" (non-empty only)" if field == "input" else ""))
        axis.set_xlabel("words")
    axes[0].set_ylabel("density")
    axes[0].legend()
    return figure


def filter_tasks(
    records: Sequence[Instruction],
    *,
    classification: bool | None = None,
    has_input: bool | None = None,
    text: str = "",
) -> list:
    """Return the records matching every given condition; ``text`` matches any field, case-insensitively."""
    needle = text.strip().lower()
    matches = []
    for record in records:
        if classification is not None and getattr(record, "is_classification", None) is not classification:
            continue
        if has_input is not None and bool(record.input.strip()) is not has_input:
            continue
        if needle and not any(needle in str(value).lower() for value in vars(record).values()):
            continue
        matches.append(record)
    return matches


def plot_leading_words(datasets: Mapping[str, Sequence[Instruction]], top: int = 12) -> Figure:
    """Return a figure with one bar panel per dataset: the ``top`` leading words by share, questions hatched."""
    figure, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 0.32 * top + 1.2),
                                constrained_layout=True, squeeze=False)
    for axis, (name, records) in zip(axes[0], datasets.items()):
        table = leading_words(records, top=top).iloc[::-1]
        bars = axis.barh(table["word"], table["share"], color="#4c72b0")
        for bar, kind in zip(bars, table["kind"]):
            if kind == "question":
                bar.set_hatch("//")
                bar.set_facecolor("#dd8452")
        axis.set_title(f"{name}: leading words")
        axis.set_xlabel("share of instructions (hatched: question words)")
    return figure
