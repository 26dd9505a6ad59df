"""The widgets that act in the published book without a kernel (alpaca_nb/static_widgets.py): their page arithmetic,
run in headless Chromium on a static page loaded as the book loads it, gives the tested functions' figures."""

from __future__ import annotations

import importlib.metadata
import random
import re
from pathlib import Path

import pytest

from alpaca_nb.costs import count_tokens, recipe_cost, recipe_terms
from alpaca_nb.data import AlpacaRecord, load_seed_tasks
from alpaca_nb.seeds import filter_tasks
from alpaca_nb.selfinstruct import assemble_prompt, encode_prompt, price_prompt, prompt_parts
from alpaca_nb.widgets import prompt_price_widget, recipe_cost_widget, seed_browser_widget
from browser import headless_chromium
from static_page import ROOT, static_page

MEASURED = dict(prompt_tokens=812.4, completion_tokens=1633.9, tasks_per_completion=16, n_instructions=52002,
                tokens_per_epoch=1.1e7, context=230.5)
# Sets a control as a reader would (value, then the events a browser fires) and returns the widget's output.
SET_CONTROL = """
const [control, value] = arguments;
if (control.multiple) { for (const option of control.options) option.selected = value.includes(Number(option.value)); }
else if (control.type === "checkbox") control.checked = value;
else control.value = value;
control.dispatchEvent(new Event("input", {bubbles: true}));
control.dispatchEvent(new Event("change", {bubbles: true}));
"""


@pytest.mark.parametrize("model", ["text-davinci-003", "gpt-4o-mini"])
def test_prompt_parts_add_up_to_the_prompt_and_its_exact_token_count(model):
    tasks = load_seed_tasks()
    parts, rng = prompt_parts(tasks, model), random.Random(0)
    for size in (0, 1, 3, 3, 3, 7, 20, 175):
        chosen = rng.sample(range(len(tasks)), size)
        prompt, tokens = assemble_prompt(parts, chosen)
        assert prompt == encode_prompt([tasks[index] for index in chosen])
        assert tokens == count_tokens(prompt, model)


def test_recipe_terms_hold_recipe_costs_inputs():
    terms = recipe_terms(models=["text-davinci-003", "gpt-4o-mini"], gpu_names=["A100-80GB"], **MEASURED)
    cost = recipe_cost(keep_rate=1.0, model="gpt-4o-mini", batch=True, gpu_name="A100-80GB", n_gpus=1, mfu=1.0, epochs=2,
                       **MEASURED)
    assert terms.batch_request_usd["text-davinci-003"] is None  # no batch API in 2023
    assert terms.batch_request_usd["gpt-4o-mini"] * 52002 / 16 == pytest.approx(cost.generation.cost_usd)
    assert terms.flops_per_epoch * 2 == pytest.approx(cost.flops.total)


def test_the_page_loads_the_anywidget_front_end_of_the_installed_anywidget():
    pinned = re.search(r"anywidget/-/anywidget-([\d.]+)\.tgz", (ROOT / "Makefile").read_text()).group(1)
    assert pinned == importlib.metadata.version("anywidget"), "renew WIDGETS_JS_PACKAGES in the Makefile with the lock"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """Return a Chromium session on a static page (no kernel) holding the three widgets, and the seed tasks."""
    tasks = load_seed_tasks()
    widgets = [seed_browser_widget(tasks, rows=4), prompt_price_widget(tasks, chosen=(0, 1, 2)),
               recipe_cost_widget(**MEASURED),
               seed_browser_widget([AlpacaRecord("<script>alert(1)</script>", "", "x")])]
    browser = headless_chromium()
    try:
        browser.get(static_page(widgets, tmp_path_factory.mktemp("static")).as_uri())
        browser.implicitly_wait(20)  # until the views rendered, then none: an empty table must not wait
        browser.find_element("css selector", ".widget-subarea:nth-of-type(4) .alpaca-nb-output")
        browser.implicitly_wait(0)
        yield browser, tasks
    finally:
        browser.quit()


def widget(browser, number: int):
    return browser.find_elements("css selector", ".alpaca-nb-static")[number]


def test_seed_browser_filters_in_the_page_as_filter_tasks_does(page):
    browser, tasks = page
    view = widget(browser, 0)
    classification, has_input = view.find_elements("css selector", "select")
    search = view.find_element("css selector", "input[type=search]")
    output = view.find_element("css selector", ".alpaca-nb-output")
    assert output.text.startswith("175 of 175 tasks match; showing 4.")
    flags = {"any": None, "yes": True, "no": False}
    for kind, given, text in [("yes", "any", ""), ("no", "yes", ""), ("any", "no", "poem"), ("any", "any", "  LIST "),
                              ("yes", "no", "the"), ("any", "any", "zebra-unicorn")]:
        for control, value in ((classification, kind), (has_input, given), (search, text)):
            browser.execute_script(SET_CONTROL, control, value)
        expected = filter_tasks(tasks, classification=flags[kind], has_input=flags[given], text=text)
        assert output.get_attribute("data-matches") == str(len(expected)), (kind, given, text)
        shown = [row.find_element("css selector", "td").text for row in output.find_elements("css selector", "tbody tr")]
        assert shown == [task.id for task in expected[:4]]


def test_seed_browser_shows_text_as_text(page):
    browser, _ = page
    cell = widget(browser, 3).find_element("css selector", "tbody td")
    assert cell.text == "<script>alert(1)</script>"


def test_prompt_price_follows_the_picker_with_exact_tokens_and_dollars(page):
    browser, tasks = page
    view = widget(browser, 1)
    picker, output = view.find_element("css selector", "select"), view.find_element("css selector", ".alpaca-nb-output")
    editor = view.find_element("css selector", "textarea")
    for chosen in ([0, 1, 2], [5], [], [3, 17, 42, 99, 174], list(range(0, 175, 9))):
        browser.execute_script(SET_CONTROL, picker, chosen)
        priced = price_prompt([tasks[index] for index in chosen])
        assert output.get_attribute("data-tokens") == str(priced.prompt_tokens)
        assert f"{len(chosen)} seeds → {priced.prompt_tokens} prompt tokens" in output.text
        assert f"prompt ${priced.prompt_usd:.4f}, worst case with a 3072-token completion ${priced.worst_case_usd:.4f}" \
            in output.text
        assert editor.get_attribute("value") == priced.prompt


def test_without_a_kernel_the_prompt_editor_is_read_only_and_says_what_it_needs(page):
    browser, _ = page
    editor = widget(browser, 1).find_element("css selector", ".alpaca-nb-needs-kernel textarea")
    assert editor.get_attribute("readonly") is not None
    notice = browser.execute_script("return getComputedStyle(arguments[0], '::before').content",
                                    editor.find_element("xpath", ".."))
    assert "make lab" in notice


def test_recipe_cost_in_the_page_equals_recipe_cost(page):
    browser, _ = page
    view = widget(browser, 2)
    output = view.find_element("css selector", ".alpaca-nb-output")
    controls = dict(zip(["keep_rate", "model", "batch", "gpu_name", "n_gpus", "mfu", "epochs"],
                        view.find_elements("css selector", "input, select")))
    rng = random.Random(1)
    for _ in range(12):
        settings = {"keep_rate": rng.choice([0.05, 0.35, 0.5, 1.0]), "model": rng.choice(["text-davinci-003", "gpt-4o-mini",
                    "gpt-4.1"]), "batch": rng.random() < 0.5, "gpu_name": rng.choice(["A100-80GB", "H100-80GB", "RTX-4090"]),
                    "n_gpus": rng.randint(1, 16), "mfu": rng.choice([0.05, 0.4, 1.0]), "epochs": rng.randint(1, 5)}
        for name, value in settings.items():
            browser.execute_script(SET_CONTROL, controls[name], value)
        cost = recipe_cost(**settings, **MEASURED)
        shown = {name: float(output.get_attribute(f"data-{name}")) for name in
                 ("requests", "generation-usd", "wall-hours", "finetune-usd", "total-usd")}
        assert shown == pytest.approx({"requests": cost.generation.requests, "generation-usd": cost.generation.cost_usd,
                                       "wall-hours": cost.finetune.wall_hours, "finetune-usd": cost.finetune.cost_usd,
                                       "total-usd": cost.total_usd}, rel=1e-12), settings
        assert f"whole recipe: ${cost.total_usd:,.2f}" in output.text
        assert f"{cost.flops.total:.3g} FLOPs" in output.text
