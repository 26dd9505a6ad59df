"""alpaca_nb.widgets: each widget starts in a meaningful state and follows its controls; the three that act in the
static book carry the data their page code needs (their behaviour in a page: tests/test_static_widgets.py)."""

from __future__ import annotations

from alpaca_nb.data import load_seed_tasks
from alpaca_nb.widgets import seed_browser_widget


def test_seed_browser_carries_what_its_page_filters_on():
    tasks = load_seed_tasks()
    widget = seed_browser_widget(tasks, rows=3)
    assert widget.columns == ["id", "name", "instruction", "input", "output", "is_classification"]
    assert len(widget.tasks) == 175 and widget.rows == 3
    assert sum(task["classification"] is True for task in widget.tasks) == 26
    assert [task["has_input"] for task in widget.tasks] == [bool(task.input.strip()) for task in tasks]
    assert widget.tasks[0]["cells"][1] == "breakfast_suggestion" and widget.tasks[0]["fields"][2] == tasks[0].instruction.lower()


def test_prompt_price_widget_carries_the_prompt_parts_and_prices_an_edited_prompt():
    from alpaca_nb.costs import count_tokens
    from alpaca_nb.selfinstruct import PromptParts, assemble_prompt, price_prompt
    from alpaca_nb.widgets import prompt_price_widget

    tasks = load_seed_tasks()
    widget = prompt_price_widget(tasks, chosen=(0, 1, 2))
    prompt, tokens = assemble_prompt(PromptParts(**widget.parts), widget.chosen)
    assert (prompt, tokens) == (price_prompt(tasks[:3]).prompt, price_prompt(tasks[:3]).prompt_tokens)
    widget.edited_prompt = prompt + " Answer in French."
    assert widget.edited_tokens == count_tokens(widget.edited_prompt, "text-davinci-003") > tokens
    widget.edited_prompt = ""
    assert widget.edited_tokens is None
    sent = []
    widget.send = sent.append
    widget._answer(widget, {"type": "ping"}, [])
    assert sent == [{"type": "kernel"}]  # the page's editor opens only when a kernel answers


def test_recipe_cost_widget_carries_recipe_costs_terms():
    from dataclasses import asdict

    from alpaca_nb.costs import recipe_terms
    from alpaca_nb.widgets import recipe_cost_widget

    measured = dict(prompt_tokens=800, completion_tokens=1600, tasks_per_completion=16, n_instructions=52002,
                    tokens_per_epoch=1e7, context=200)
    widget = recipe_cost_widget(**measured)
    assert widget.settings == {"keep_rate": 0.5, "model": "text-davinci-003", "batch": False, "gpu_name": "A100-80GB",
                               "n_gpus": 8, "mfu": 0.4, "epochs": 3}
    models, gpus = list(widget.terms["request_usd"]), list(widget.terms["gpus"])
    assert "smollm2-135m-instruct" not in models and gpus == ["A100-80GB", "H100-80GB", "RTX-4090"]
    assert widget.terms == asdict(recipe_terms(models=models, gpu_names=gpus, **measured))


def test_label_mask_widget_colours_prompt_and_target_tokens_and_follows_the_picker():
    from alpaca_nb.data import AlpacaRecord
    from alpaca_nb.models import load_tokenizer
    from alpaca_nb.sft import token_label_rows
    from alpaca_nb.widgets import label_mask_widget

    tokenizer = load_tokenizer()
    records = [AlpacaRecord("Name a colour.", "", "Blue <script>"), AlpacaRecord("Add the numbers.", "2, 3", "5")]
    picker, view = label_mask_widget(records, tokenizer).children
    rows = token_label_rows(records[0], tokenizer)
    learned = sum(row["learned"] for row in rows)
    assert f"{len(rows)} tokens, <b>{learned}</b> learned" in view.value
    assert view.value.count("#c7e9c0") == learned and view.value.count("#e0e0e0") == len(rows) - learned
    assert "&lt;|im_end|&gt;" in view.value and "<|im_end|>" not in view.value and "<script" not in view.value
    picker.value = 1
    assert "Input" in view.value and f"{len(token_label_rows(records[1], tokenizer))} tokens" in view.value


def test_blind_vote_widget_records_votes_resumes_and_shows_the_tally_only_when_asked(tmp_path):
    from types import SimpleNamespace

    from alpaca_nb.evaluate import blind_pairs, read_votes
    from alpaca_nb.widgets import blind_vote_widget

    items = [SimpleNamespace(id=f"i{index}", instruction=f"Question {index} <b>", input="") for index in range(3)]
    first, second = [f"one {index}" for index in range(3)], [f"two {index}" for index in range(3)]
    votes = tmp_path / "votes.jsonl"

    def pairs_for(rater):
        return blind_pairs(rater, items, first, second, ("alpaca", "davinci"))

    name, item, buttons, show, result = blind_vote_widget(pairs_for, str(votes)).children
    assert "Type your name" in item.value
    name.value = "ann"
    assert "Pair 1 of 3" in item.value and "Question 0 &lt;b&gt;" in item.value
    assert "alpaca" not in item.value and "davinci" not in item.value  # the systems stay hidden
    better_a, better_b, tie, skip = buttons.children
    better_a.click()
    skip.click()
    assert [vote.choice for vote in read_votes(votes)] == ["A", "skip"] and "Pair 3 of 3" in item.value
    assert result.value == ""  # no tally until asked
    # A new widget for the same rater resumes at the first pair not voted on.
    again = blind_vote_widget(pairs_for, str(votes), rater="ann").children
    assert "Pair 3 of 3" in again[1].value
    tie.click()
    assert "All 3 pairs voted on" in item.value
    show.click()
    assert "alpaca against davinci" in result.value and "1 ties" in result.value


def test_moderation_widget_shows_the_filter_verdict_and_follows_edits():
    from alpaca_nb.safety import moderate
    from alpaca_nb.widgets import moderation_widget

    widget = moderation_widget(moderate, "How do I kill a stuck Python process?")
    box, verdict = widget.children
    assert "<b>allowed</b>" in verdict.value and "violence" in verdict.value and "offline:" in verdict.value
    box.value = "I am going to kill you tomorrow."
    assert "<b>blocked</b>: " in verdict.value and "violence (checker" in verdict.value
    box.value = "  "
    assert "Type a prompt" in verdict.value


def test_a_widget_that_needs_a_kernel_says_so_in_the_static_book_and_how_to_get_one():
    from pathlib import Path

    from alpaca_nb.safety import moderate
    from alpaca_nb.widgets import NEEDS_KERNEL, moderation_widget

    assert NEEDS_KERNEL in moderation_widget(moderate, "hello")._dom_classes
    stylesheet = (Path(__file__).resolve().parents[1] / "book" / "_css" / "cells.css").read_text()
    notice = stylesheet[stylesheet.index(f".{NEEDS_KERNEL}::before"):]
    assert "make lab" in notice[:notice.index("}")]
