"""The chapters' widgets: views over tested alpaca_nb functions, with no logic of their own.

Each ``*_widget`` returns a widget whose first state is already meaningful, so the static book (no kernel) shows
real content. Three act in the static book as well (the seed browser, the prompt price, the recipe's cost: their
arithmetic runs in the page, ``static_widgets``); the rest are ipywidgets that need a kernel, and say so there.
"""

from __future__ import annotations

import html
from typing import Callable, Sequence

import ipywidgets as widgets

from alpaca_nb.static_widgets import PromptPriceWidget, RecipeCostWidget, SeedBrowserWidget

__all__ = ["blind_vote_widget", "chat_demo_widget", "label_mask_widget", "moderation_widget", "prompt_price_widget",
           "recipe_cost_widget", "seed_browser_widget"]

# The book's stylesheet (book/_css/cells.css) says on these widgets, in the static pages only, that their controls
# need a live kernel and how to get one; the book check fails any other control that does nothing there.
NEEDS_KERNEL = "alpaca-nb-needs-kernel"


def _needs_kernel(box: widgets.Box) -> widgets.Box:
    box.add_class(NEEDS_KERNEL)
    return box


def seed_browser_widget(tasks: Sequence[object], rows: int = 10) -> SeedBrowserWidget:
    """Return a browser over ``tasks``: filter by classification and input, search text, see the matches.
    It acts in the static book too (static_widgets)."""
    return SeedBrowserWidget(tasks, rows=rows)


def prompt_price_widget(tasks: Sequence[object], chosen: Sequence[int] = (0, 1, 2), model: str = "text-davinci-003",
                        max_tokens: int = 3072) -> PromptPriceWidget:
    """Return a picker of seed tasks that shows the exact generation prompt, its tokens and its price (in the static
    book too); with a kernel, the prompt can be edited and is priced again."""
    return PromptPriceWidget(tasks, chosen=chosen, model=model, max_tokens=max_tokens)


def recipe_cost_widget(**measured: object) -> RecipeCostWidget:
    """Return sliders (keep rate, price, GPU, MFU, epochs) over costs.recipe_cost, acting in the static book too;
    ``measured`` holds the measured inputs (prompt_tokens, completion_tokens, tasks_per_completion, n_instructions,
    tokens_per_epoch, context)."""
    from alpaca_nb.costs import known_models

    models = ["text-davinci-003", *(model for model in known_models() if model not in ("text-davinci-003",
                                                                                        "smollm2-135m-instruct"))]
    return RecipeCostWidget(models=models, gpu_names=["A100-80GB", "H100-80GB", "RTX-4090"], **measured)


def label_mask_widget(records: Sequence[object], tokenizer: object, start: int = 0, max_length: int = 512) -> widgets.VBox:
    """Return a record picker that colours each token: grey = prompt (label -100, not learned), green = learned."""
    from alpaca_nb.sft import token_label_rows

    picker = widgets.IntSlider(value=start, min=0, max=len(records) - 1, description="record")
    view = widgets.HTML()

    def refresh(_change: object = None) -> None:
        rows = token_label_rows(records[picker.value], tokenizer, max_length=max_length)
        spans = "".join(
            f"<span title='id {row['token_id']}, label {row['label']}' style='background:"
            f"{'#c7e9c0' if row['learned'] else '#e0e0e0'}; margin:1px; padding:0 2px; white-space:pre-wrap'>"
            f"{html.escape(row['token'])}</span>" for row in rows)
        learned = sum(row["learned"] for row in rows)
        view.value = (f"<p>{len(rows)} tokens, <b>{learned}</b> learned (green), {len(rows) - learned} prompt "
                      f"tokens masked with -100 (grey)</p><div style='font-family: monospace; font-size: 0.8em'>{spans}</div>")

    picker.observe(refresh, names="value")
    refresh()
    return _needs_kernel(widgets.VBox([picker, view]))


def blind_vote_widget(pairs_for: Callable[[str], Sequence[object]], votes_path: str, rater: str = "") -> widgets.VBox:
    """Return the blind pairwise comparison: a rater's name, one instruction with answers A and B, four buttons.

    ``pairs_for(rater)`` returns that rater's blind pairs (``evaluate.blind_pairs``: order random per item,
    seeded per rater). Each vote is appended to ``votes_path`` at once, so a rater who comes back resumes
    at the first pair not yet voted on. The tally, with the raters' agreement, shows only when asked for.
    """
    from alpaca_nb.evaluate import next_pair, rater_agreement, read_votes, record_vote, tally

    name = widgets.Text(value=rater, description="rater", placeholder="your name")
    item = widgets.HTML()
    buttons = {choice: widgets.Button(description=label) for choice, label in
               (("A", "A is better"), ("B", "B is better"), ("tie", "tie"), ("skip", "skip"))}
    show = widgets.Button(description="show the tally")
    result = widgets.HTML()
    current: dict[str, object] = {}

    def refresh(_change: object = None) -> None:
        result.value = ""
        if not name.value.strip():
            current.pop("pair", None)
            item.value = "<p>Type your name to start (each rater sees the answers in their own random order).</p>"
            return
        pairs = pairs_for(name.value.strip())
        votes = [vote for vote in read_votes(votes_path) if vote.rater == name.value.strip()]
        pair = next_pair(pairs, votes, name.value)
        current["pair"] = pair
        if pair is None:
            item.value = f"<p>All {len(pairs)} pairs voted on. Thank you.</p>"
            return
        answer = "<div style='white-space:pre-wrap; border:1px solid #ccc; padding:4px'>{}</div>"
        item.value = (f"<p>Pair {len(votes) + 1} of {len(pairs)}</p><p><b>{html.escape(pair.instruction)}</b></p>"
                      + (f"<p>{html.escape(pair.input)}</p>" if pair.input else "")
                      + f"<p>A</p>{answer.format(html.escape(pair.answer_a))}"
                      + f"<p>B</p>{answer.format(html.escape(pair.answer_b))}")

    def vote(choice: str) -> None:
        pair = current.get("pair")
        if pair is not None:
            record_vote(votes_path, name.value, pair, choice)
        refresh()

    def show_tally(_button: object = None) -> None:
        votes = read_votes(votes_path)
        systems = sorted({system for vote in votes for system in (vote.system_a, vote.system_b)})
        if len(systems) != 2:
            result.value = "<p>No votes yet.</p>"
            return
        rate = tally(votes, systems[0], systems[1])
        agreement = rater_agreement(votes)
        agreed = ("" if agreement is None else
                  f"<br>{agreement.statistic} = {agreement.kappa:.2f} ({agreement.raters} raters, {agreement.items} shared items)")
        result.value = (f"<p>{html.escape(systems[0])} against {html.escape(systems[1])}: {rate.wins} wins, {rate.losses} "
                        f"losses, {rate.ties} ties; win rate {rate.rate:.0%} (95 % {rate.ci_low:.0%} to {rate.ci_high:.0%}), "
                        f"sign test p = {rate.p_value:.2f}{agreed}</p>")

    for choice, button in buttons.items():
        button.on_click(lambda _button, choice=choice: vote(choice))
    show.on_click(show_tally)
    name.observe(refresh, names="value")
    refresh()
    return _needs_kernel(widgets.VBox([name, item, widgets.HBox(list(buttons.values())), show, result]))


def moderation_widget(check: Callable[[str], object], text: str = "") -> widgets.VBox:
    """Return a text box and the content filter's verdict on it: flagged or not, each category's flag and score.

    ``check`` is ``safety.moderate`` (or it bound to an API client); the verdict follows each edit.
    """
    box = widgets.Textarea(value=text, placeholder="type a prompt", description="prompt",
                           layout=widgets.Layout(width="95%", height="4em"), continuous_update=False)
    verdict = widgets.HTML()

    def refresh(_change: object = None) -> None:
        if not box.value.strip():
            verdict.value = "<p>Type a prompt to see what the filter says.</p>"
            return
        result = check(box.value)
        rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{'flagged' if result.categories[name] else ''}</td>"
                       f"<td>{result.scores[name]:.2f}</td></tr>" for name in result.categories)
        headline = "<b>blocked</b>: " + ", ".join(map(html.escape, result.flagged_categories())) if result.flagged \
            else "<b>allowed</b>"
        verdict.value = (f"<p>{headline} (checker: {html.escape(result.checker)})</p>"
                         f"<table><tr><th>category</th><th></th><th>score</th></tr>{rows}</table>")

    box.observe(refresh, names="value")
    refresh()
    return _needs_kernel(widgets.VBox([box, verdict]))


def chat_demo_widget(demo, instruction: str = "", input_text: str = "") -> widgets.VBox:
    """Return the chat demo's view over ``demo`` (a ``demo.ChatDemo``): the terms of use, the boxes and controls,
    Generate, Stop and Flag, the streamed reply and the history.

    The static book shows the terms and whatever ``demo.history`` holds when the cell runs. Generation runs in
    a worker thread that sets the reply widget's value; it never writes through ``with output:``.
    """
    import threading

    from alpaca_nb.demo import DecodingSettings, history_html, reply_html, terms_of_use

    terms = widgets.HTML(f"<p><b>Terms of use.</b> {html.escape(terms_of_use(demo.can_watermark))}</p>")
    wide = widgets.Layout(width="95%")
    instruction_box = widgets.Textarea(value=instruction, description="instruction", layout=wide)
    input_box = widgets.Textarea(value=input_text, description="input", placeholder="optional", layout=wide)
    template = widgets.Dropdown(options=[("Alpaca template", "alpaca"), ("the model's chat template", "chat")],
                                description="template")
    temperature = widgets.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.1, description="temperature")
    top_p = widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top-p")
    top_k = widgets.IntSlider(value=0, min=0, max=100, description="top-k (0 off)")
    beams = widgets.IntSlider(value=1, min=1, max=4, description="beams")
    max_tokens = widgets.IntSlider(value=128, min=8, max=512, step=8, description="max tokens")
    watermark = widgets.Checkbox(value=demo.can_watermark, disabled=not demo.can_watermark,
                                 description="watermark" if demo.can_watermark else "watermark (not on an external server)")
    generate, stop = widgets.Button(description="Generate", button_style="primary"), widgets.Button(description="Stop")
    reason = widgets.Text(placeholder="what is wrong with the last answer?", description="reason")
    flag = widgets.Button(description="Flag this answer", button_style="warning")
    status, reply, history = widgets.HTML(), widgets.HTML(), widgets.HTML()
    for name, widget in (("status", status), ("reply", reply), ("history", history)):
        widget.add_class(f"alpaca-nb-demo-{name}")  # stable handles for a page's styles and the browser test

    def show_history() -> None:
        history.value = history_html(demo.history)

    def run() -> None:
        settings = DecodingSettings(template.value, temperature.value, top_p.value, top_k.value, beams.value,
                                    max_tokens.value, watermark.value)
        try:
            for text in demo.respond(instruction_box.value, input_box.value, settings):
                reply.value = reply_html(text)
            status.value = ""
        except ValueError as error:  # a refused length or a wrong template: the message says what to change
            status.value = f"<p>{html.escape(str(error))}</p>"
        finally:
            reply.value = ""
            generate.disabled = False
            show_history()

    def on_generate(_button: object) -> None:
        generate.disabled = True
        status.value = "<p>generating…</p>"
        threading.Thread(target=run, daemon=True).start()

    def on_flag(_button: object) -> None:
        try:
            path = demo.flag(-1, reason.value)
        except ValueError as error:
            status.value = f"<p>{html.escape(str(error))}</p>"
            return
        reason.value = ""
        status.value = f"<p>Flagged; saved to {html.escape(str(path))}.</p>"

    generate.on_click(on_generate)
    stop.on_click(lambda _button: demo.stop())
    flag.on_click(on_flag)
    show_history()
    controls = widgets.VBox([template, temperature, top_p, top_k, beams, max_tokens, watermark])
    return _needs_kernel(widgets.VBox([terms, instruction_box, input_box, controls, widgets.HBox([generate, stop]),
                                       status, reply, history, widgets.HBox([reason, flag])]))
