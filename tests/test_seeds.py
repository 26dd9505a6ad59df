"""alpaca_nb.seeds on hand-written records and on the real seed tasks."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest

from alpaca_nb.data import AlpacaRecord, load_alpaca_data, load_seed_tasks
from alpaca_nb.seeds import (
    compare_datasets,
    filter_tasks,
    leading_word,
    leading_words,
    length_frame,
    plot_leading_words,
    plot_length_distributions,
    records_frame,
    shorten,
    word_count,
)


@pytest.fixture(scope="module")
def seeds():
    return load_seed_tasks()


@pytest.mark.parametrize(
    ("instruction", "word"),
    [("Give three tips.", "give"), ("  \"Rewrite\" the text", "rewrite"), ("What's up?", "what's"), ("123 go", "go"), ("???", "")],
)
def test_leading_word_is_lower_case_and_ignores_punctuation(instruction, word):
    assert leading_word(instruction) == word


def test_leading_words_marks_questions_and_counts_shares():
    records = [AlpacaRecord("Give a tip.", "", "x"), AlpacaRecord("give two.", "", "x"), AlpacaRecord("What is it?", "", "x")]
    table = leading_words(records)
    assert table.to_dict("records") == [
        {"word": "give", "kind": "other", "count": 2, "share": 2 / 3},
        {"word": "what", "kind": "question", "count": 1, "share": 1 / 3},
    ]


def test_word_count_and_length_frame():
    assert word_count("  two  words\n") == 2
    frame = length_frame([AlpacaRecord("a b c", "", "d e")])
    assert frame.iloc[0].to_dict() == {"instruction_words": 3, "input_words": 0, "output_words": 2}


def test_compare_datasets_on_the_real_files(seeds):
    alpaca = load_alpaca_data(asset="alpaca_sample")
    table = compare_datasets({"seeds": seeds, "alpaca": alpaca})
    assert table.loc["records", "seeds"] == 175 and table.loc["records", "alpaca"] == 100
    assert table.loc["share classification", "seeds"] == pytest.approx(26 / 175)
    assert table.loc["share with an input", "alpaca"] == pytest.approx(0.46)
    assert table.loc["share classification", "alpaca"] != table.loc["share classification", "alpaca"]  # NaN: no flag


def test_filter_tasks_combines_conditions(seeds):
    classification = filter_tasks(seeds, classification=True)
    assert len(classification) == 26
    without_input = filter_tasks(seeds, has_input=False)
    assert all(not task.input.strip() for task in without_input)
    assert len(filter_tasks(seeds, classification=True, has_input=False)) <= len(classification)
    assert [task.id for task in filter_tasks(seeds, text="BREAKFAST")] == ["seed_task_0"]
    assert filter_tasks(seeds, text="no task mentions this zebra-unicorn") == []


def test_shorten_and_records_frame():
    assert shorten("abcdef", 4) == "abc…" and shorten("abc", 4) == "abc" and shorten(5, 1) == 5
    frame = records_frame([AlpacaRecord("x" * 50, "", "y")], max_chars=10)
    assert frame.loc[0, "instruction"] == "x" * 9 + "…"


def test_plots_have_a_panel_per_field_and_per_dataset(seeds):
    figure = plot_length_distributions({"seeds": seeds})
    assert [axis.get_title() for axis in figure.axes] == ["instruction length", "input length (non-empty only)", "output length"]
    longest_instruction = max(len(task.instruction.split()) for task in seeds)
    assert figure.axes[0].get_xlim()[1] <= longest_instruction * 1.05  # ends at the 99th percentile, not beyond
    figure = plot_leading_words({"a": seeds, "b": seeds}, top=5)
    assert len(figure.axes) == 2 and len(figure.axes[0].patches) == 5


def test_quality_statistics_measure_echoes_short_outputs_and_sample_the_same_size():
    from alpaca_nb.data import AlpacaRecord
    from alpaca_nb.seeds import quality_statistics, repeats_instruction_or_input

    echo = AlpacaRecord("Rewrite the sentence in the past tense.", "I go home.", "I go home.")
    contains = AlpacaRecord("Name three primary colours.", "", "Name three primary colours: red, yellow, blue.")
    short = AlpacaRecord("Give the capital of France.", "", "Paris.")
    fine = AlpacaRecord("Explain why the sky is blue.", "", "Air scatters blue light more than red light.")
    assert repeats_instruction_or_input(echo) and repeats_instruction_or_input(contains)
    assert not repeats_instruction_or_input(short) and not repeats_instruction_or_input(fine)
    table = quality_statistics({"ours": [echo, contains, short, fine], "theirs": [fine, short]},
                               ["Explain why the sky is blue."])
    assert table.loc["share repeating the instruction or input", "ours"] == 0.5
    assert table.loc["share of outputs under 3 words", "ours"] == 0.25 and table.loc["records", "theirs"] == 2
    assert table.loc["distinct leading words in the first 2", "ours"] == 2  # equal samples: the first 2 of each
    assert table.loc["mean ROUGE-L to the nearest seed", "theirs"] > table.loc["mean ROUGE-L to the nearest seed", "ours"]
