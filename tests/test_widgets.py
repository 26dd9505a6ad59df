"""alpaca_nb.widgets: the seed browser starts in a meaningful state and follows its controls."""

from __future__ import annotations

from alpaca_nb.data import load_seed_tasks
from alpaca_nb.widgets import seed_browser_widget


def controls(widget):
    title, row, results = widget.children
    classification, has_input, search = row.children
    return classification, has_input, search, results


def test_first_state_shows_all_tasks():
    widget = seed_browser_widget(load_seed_tasks(), rows=3)
    *_, results = controls(widget)
    assert "<b>175</b> of 175 tasks match; showing 3." in results.value
    assert "breakfast_suggestion" in results.value


def test_controls_filter_the_table():
    widget = seed_browser_widget(load_seed_tasks(), rows=3)
    classification, has_input, search, results = controls(widget)
    classification.value = "yes"
    assert "<b>26</b> of 175" in results.value
    search.value = "zebra-unicorn that no task mentions"
    assert "<b>0</b> of 175 tasks match" in results.value and "<table" not in results.value


def test_text_is_escaped():
    from alpaca_nb.data import AlpacaRecord

    widget = seed_browser_widget([AlpacaRecord("<script>alert(1)</script>", "", "x")])
    *_, results = controls(widget)
    assert "<script>" not in results.value and "&lt;script&gt;" in results.value


def test_prompt_price_widget_shows_prompt_tokens_and_price():
    from alpaca_nb.selfinstruct import price_prompt
    from alpaca_nb.widgets import prompt_price_widget

    tasks = load_seed_tasks()
    widget = prompt_price_widget(tasks, chosen=(0, 1, 2))
    _, picker, summary, prompt_view = widget.children
    expected = price_prompt(tasks[:3])
    assert f"<b>{expected.prompt_tokens}</b> prompt tokens" in summary.value
    assert f"${expected.prompt_usd:.4f}" in summary.value and prompt_view.value.removesuffix("</pre>").endswith("4. Instruction:")
    picker.value = (5,)
    assert "<b>1</b> seeds" in summary.value and "2. Instruction:" in prompt_view.value


def test_recipe_cost_widget_updates_its_totals():
    from alpaca_nb.widgets import recipe_cost_widget

    widget = recipe_cost_widget(prompt_tokens=800, completion_tokens=1600, tasks_per_completion=16, n_instructions=52002,
                                tokens_per_epoch=1e7, context=200)
    keep_rate, *_, totals = widget.children[1:]
    assert "6,500</b> requests" in totals.value  # 52002 / (16 * 0.5)
    keep_rate.value = 1.0
    assert "3,250</b> requests" in totals.value


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
