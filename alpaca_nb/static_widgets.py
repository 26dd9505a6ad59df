"""Widgets that act in the published book without a kernel: anywidget views whose front-end code ships in the page.

The static book has no Python behind its pages. Where a widget's output is arithmetic on data the page already
holds, Python computes that data once, when the cell runs (each seed's prompt block and its tokens, one request's
dollars at each model's prices, the fields the seed filter searches), and a short module in
``alpaca_nb/widgets_js/`` does the arithmetic in the browser: in the published page and in a live notebook alike.
Each module mirrors one tested function, and tests/test_static_widgets.py checks in Chromium that the page's
figures equal that function's (``seeds.filter_tasks``, ``selfinstruct.assemble_prompt``, ``costs.recipe_cost``).
What needs Python (tokenising a prompt the reader edited) is answered by the kernel where there is one; without
one the control says that it needs a live kernel and how to get one (``make lab``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import anywidget
import traitlets

from alpaca_nb.seeds import shorten

__all__ = ["PromptPriceWidget", "RecipeCostWidget", "SeedBrowserWidget"]

_CODE = Path(__file__).with_name("widgets_js")
_CSS = (_CODE / "static_widgets.css").read_text(encoding="utf-8")


def _module_code(name: str) -> str:
    return (_CODE / name).read_text(encoding="utf-8")


class SeedBrowserWidget(anywidget.AnyWidget):
    """Filter seed tasks by classification and input and search their text, as ``seeds.filter_tasks`` does."""

    _esm = _module_code("seed_browser.js")
    _css = _CSS
    columns = traitlets.List(traitlets.Unicode()).tag(sync=True)
    tasks = traitlets.List(traitlets.Dict()).tag(sync=True)  # per task: cells shown, fields searched, two flags
    rows = traitlets.Int(10).tag(sync=True)
    classification = traitlets.Unicode("any").tag(sync=True)  # any, yes or no: the controls' state
    has_input = traitlets.Unicode("any").tag(sync=True)
    search = traitlets.Unicode("").tag(sync=True)

    def __init__(self, tasks: Sequence[object], rows: int = 10, max_chars: int = 100) -> None:
        columns = list(vars(tasks[0])) if tasks else []
        super().__init__(columns=columns, rows=rows, tasks=[_browsable(task, max_chars) for task in tasks])


def _browsable(task: object, max_chars: int) -> dict:
    # The same reading of a record as filter_tasks: every field lower-cased for the search, the two flags.
    values = vars(task)
    return {"cells": [str(shorten(value, max_chars)) for value in values.values()],
            "fields": [str(value).lower() for value in values.values()],
            "classification": getattr(task, "is_classification", None),
            "has_input": bool(task.input.strip())}


class PromptPriceWidget(anywidget.AnyWidget):
    """Pick seeds and see the exact generation prompt, its tokens and its price; edit it with a kernel."""

    _esm = _module_code("prompt_price.js")
    _css = _CSS
    labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    parts = traitlets.Dict().tag(sync=True)   # selfinstruct.PromptParts
    rates = traitlets.Dict().tag(sync=True)   # model, dollars per 1M prompt and completion tokens, max_tokens
    chosen = traitlets.List(traitlets.Int()).tag(sync=True)
    edited_prompt = traitlets.Unicode("").tag(sync=True)  # the reader's edit, priced by the kernel
    edited_tokens = traitlets.Int(None, allow_none=True).tag(sync=True)

    def __init__(self, tasks: Sequence[object], chosen: Sequence[int] = (0, 1, 2), model: str = "text-davinci-003",
                 max_tokens: int = 3072) -> None:
        from alpaca_nb.costs import price
        from alpaca_nb.selfinstruct import prompt_parts

        rates = price(model)
        super().__init__(labels=[f"{index}: {shorten(task.instruction, 70)}" for index, task in enumerate(tasks)],
                         parts=asdict(prompt_parts(tasks, model)), chosen=list(chosen),
                         rates={"model": model, "input_per_1m": rates.input_per_1m,
                                "output_per_1m": rates.output_per_1m, "max_tokens": max_tokens})
        self.on_msg(self._answer)

    @traitlets.observe("edited_prompt")
    def _count_edit(self, change: dict) -> None:
        from alpaca_nb.costs import count_tokens

        self.edited_tokens = count_tokens(change["new"], self.rates["model"]) if change["new"] else None

    def _answer(self, _widget: object, content: dict, _buffers: object) -> None:
        if content.get("type") == "ping":  # the page asks whether a kernel is behind it
            self.send({"type": "kernel"})


class RecipeCostWidget(anywidget.AnyWidget):
    """Sliders over the recipe's cost: keep rate, teacher prices, batch API, GPU, GPUs, MFU, epochs."""

    _esm = _module_code("recipe_cost.js")
    _css = _CSS
    terms = traitlets.Dict().tag(sync=True)  # costs.RecipeTerms
    settings = traitlets.Dict().tag(sync=True)

    def __init__(self, *, models: Sequence[str], gpu_names: Sequence[str], **measured: object) -> None:
        from alpaca_nb.costs import recipe_terms

        terms = recipe_terms(models=list(models), gpu_names=list(gpu_names), **measured)
        super().__init__(terms=asdict(terms), settings={
            "keep_rate": 0.5, "model": models[0], "batch": False, "gpu_name": gpu_names[0], "n_gpus": 8, "mfu": 0.4,
            "epochs": 3})
