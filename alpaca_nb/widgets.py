"""ipywidgets views over tested alpaca_nb functions; no logic of their own.

Each ``*_widget`` returns a widget whose first state is already meaningful, so the static
book (no kernel) shows real content.
"""

from __future__ import annotations

from typing import Sequence

import ipywidgets as widgets

from alpaca_nb.seeds import filter_tasks, records_frame

__all__ = ["seed_browser_widget"]

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
