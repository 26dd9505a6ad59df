"""ipywidgets views over tested alpaca_nb functions; no logic of their own.

Each ``*_widget`` returns a widget whose first state is already meaningful, so the static
book (no kernel) shows real content.
"""

from __future__ import annotations

import html
from typing import Sequence

import ipywidgets as widgets

from alpaca_nb.seeds import filter_tasks, records_frame, shorten

__all__ = ["prompt_price_widget", "seed_browser_widget"]

_CHOICES = {"any": None, "yes": True, "no": False}


def _table_html(records: Sequence[object], total: int, rows: int) -> str:
    header = f"<p><b>{len(records)}</b> of {total} tasks match; showing {min(rows, len(records))}.</p>"
    if not records:
        return header
    frame = records_frame(records[:rows], max_chars=100)
    return header + frame.to_html(index=False, escape=True, classes="alpaca-nb-table")


def seed_browser_widget(tasks: Sequence[object], rows: int = 10) -> widgets.VBox:
    """Return a browser over ``tasks``: filter by classification and input, search text, see the matches."""
    classification = widgets.Dropdown(options=list(_CHOICES), value="any", description="classification")
    has_input = widgets.Dropdown(options=list(_CHOICES), value="any", description="has input")
    search = widgets.Text(value="", placeholder="search instruction, input, output", description="search")
    results = widgets.HTML()

    def refresh(_change: object = None) -> None:
        matches = filter_tasks(tasks, classification=_CHOICES[classification.value],
                               has_input=_CHOICES[has_input.value], text=search.value)
        results.value = _table_html(matches, len(tasks), rows)

    for control in (classification, has_input, search):
        control.observe(refresh, names="value")
    refresh()
    title = widgets.HTML(f"<b>Seed task browser</b> ({len(tasks)} tasks)")
    return widgets.VBox([title, widgets.HBox([classification, has_input, search]), results])


def prompt_price_widget(tasks: Sequence[object], chosen: Sequence[int] = (0, 1, 2), model: str = "text-davinci-003",
                        max_tokens: int = 3072) -> widgets.VBox:
    """Return a picker of seed tasks that shows the exact generation prompt, its tokens and its price."""
    from alpaca_nb.selfinstruct import price_prompt

    labels = [(f"{index}: {shorten(task.instruction, 70)}", index) for index, task in enumerate(tasks)]
    picker = widgets.SelectMultiple(options=labels, value=tuple(chosen), rows=8, description="seeds",
                                    layout=widgets.Layout(width="95%"))
    summary, prompt_view = widgets.HTML(), widgets.HTML()

    def refresh(_change: object = None) -> None:
        priced = price_prompt([tasks[index] for index in picker.value], model=model, max_tokens=max_tokens)
        summary.value = (f"<p><b>{len(picker.value)}</b> seeds &rarr; <b>{priced.prompt_tokens}</b> prompt tokens "
                         f"({model} tokenizer); prompt ${priced.prompt_usd:.4f}, worst case with a "
                         f"{max_tokens}-token completion ${priced.worst_case_usd:.4f} at {model} prices.</p>")
        prompt_view.value = f"<pre style='white-space: pre-wrap; font-size: 0.8em'>{html.escape(priced.prompt)}</pre>"

    picker.observe(refresh, names="value")
    refresh()
    return widgets.VBox([widgets.HTML("<b>Build a generation prompt</b> (pick seeds with Ctrl/Cmd-click)"),
                         picker, summary, prompt_view])
