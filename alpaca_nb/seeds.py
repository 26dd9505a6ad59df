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
    "quality_statistics",
    "records_frame",
    "repeats_instruction_or_input",
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
    """Return one column per dataset: size, share with an input, share of classification, median lengths.

    Distinct leading words are counted in the first n records of each dataset, n the smallest size:
    the count grows with the sample, so unequal samples would not compare. A dataset that records no
    classification flag gets NaN there (shown as "not recorded" by the chapters).
    """
    sample = min(len(records) for records in datasets.values())
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
            f"distinct leading words in the first {sample}": len({leading_word(r.instruction) for r in records[:sample]}),
        }
    return pd.DataFrame(summary)


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def repeats_instruction_or_input(record: Instruction) -> bool:
    """Return True when the output only echoes: it equals the instruction or the input, or contains the instruction."""
    output, instruction, task_input = (_normalised(text) for text in (record.output, record.instruction, record.input))
    return output in (instruction, task_input) or (len(instruction.split()) >= 4 and instruction in output)


def quality_statistics(datasets: Mapping[str, Sequence[Instruction]], seed_instructions: Sequence[str],
                       sample_size: int | None = None) -> pd.DataFrame:
    """Return one column per dataset: how much of it is usable training data (chapter 2).

    Rows: records; share of outputs shorter than three words; share whose output only repeats the
    instruction or the input; distinct leading words in a sample of the same size from every dataset
    (``sample_size``, default the smallest dataset: counts of distinct words grow with the sample);
    mean ROUGE-L F of each instruction to its most similar seed instruction.
    """
    from alpaca_nb.rouge import RougeLFilter

    size = sample_size or min(len(records) for records in datasets.values())
    reference = RougeLFilter(seed_instructions)
    summary = {}
    for name, records in datasets.items():
        records = list(records)
        summary[name] = {
            "records": len(records),
            "share of outputs under 3 words": _mean([word_count(record.output) < 3 for record in records]),
            "share repeating the instruction or input": _mean([repeats_instruction_or_input(r) for r in records]),
            f"distinct leading words in the first {size}": len({leading_word(r.instruction) for r in records[:size]}),
            "mean ROUGE-L to the nearest seed": _mean([reference.max_similarity(r.instruction) for r in records]),
        }
    return pd.DataFrame(summary)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")  # nan: an empty set has no share


def plot_length_distributions(datasets: Mapping[str, Sequence[Instruction]], bins: int = 30) -> Figure:
    """Return a figure with one panel per field: word-count histograms, normalised per dataset."""
    figure, axes = plt.subplots(1, len(FIELDS), figsize=(12, 3.4), constrained_layout=True)
    for axis, field in zip(axes, FIELDS):
        longest = 0.0
        for name, records in datasets.items():
            counts = [word_count(getattr(record, field)) for record in records]
            if field == "input":
                counts = [count for count in counts if count] or [0]  # empty inputs are shown as a share elsewhere
            axis.hist(counts, bins=bins, density=True, alpha=0.55, label=name)
            longest = max(longest, float(pd.Series(counts).quantile(0.99)))
        # A few very long inputs would stretch the axis far past where nearly all records lie.
        axis.set_xlim(0, max(5.0, longest * 1.05))
        axis.set_title(f"{field} length" + (" (non-empty only)" if field == "input" else ""))
        axis.set_xlabel("words (the axis spans 99 % of the records)")
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
