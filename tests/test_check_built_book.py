"""The built-book checker's verdicts on hand-written pages (the real run is `make book`'s last step)."""

from __future__ import annotations

from check_built_book import check_expectations, inspect_page, parse_expectations

VIEW = '<script type="application/vnd.jupyter.widget-view+json">{"model_id": "m"}</script>'


STYLESHEET = '<link rel="stylesheet" type="text/css" href="_static/cells.css?v=1" />'


def page_with(tmp_path, body: str, head: str = STYLESHEET):
    (tmp_path / "plot.png").write_bytes(b"\x89PNG data")
    page = tmp_path / "chapter.html"
    html = f"<html><head>{head}</head><body><article>{body}</article></body></html>"
    page.write_text(html)
    return page, html


PLOT = '<figure><img src="plot.png"><figcaption><p>What the plot shows.</p></figcaption></figure>'


def test_a_clean_page_with_plot_and_rendered_widget_passes(tmp_path):
    page, html = page_with(tmp_path, f'<div class="cell_output">{PLOT}</div><div class="cell_output">{VIEW}</div>')
    rendered = html.replace(VIEW, VIEW + RENDERED_WITH_CONTENT)
    report = inspect_page(page, html, rendered)
    assert report.problems == [] and report.images == 1 and report.widget_views == 1 and report.rendered_widgets == 1


RENDERED_WITH_CONTENT = ('<div class="widget-subarea"><div class="jupyter-widgets"><label>price</label>'
                         '<div class="widget-html-content"><p>$0.02 per request</p></div></div></div>')


def test_a_widget_that_shows_only_its_controls_is_a_problem(tmp_path):
    page, html = page_with(tmp_path, f'<div class="cell_output">{VIEW}</div>')
    bare = ('<div class="widget-subarea"><div class="jupyter-widgets"><label>temperature</label><input value="0.7">'
            '<div class="widget-html-content"></div><div class="widget-output"></div></div></div>')
    [problem] = inspect_page(page, html, html.replace(VIEW, VIEW + bare)).problems
    assert problem.startswith("a widget shows nothing but its controls") and "temperature" in problem
    table = RENDERED_WITH_CONTENT.replace("<p>$0.02 per request</p>", "<table><tr><td></td></tr></table>")
    assert inspect_page(page, html, html.replace(VIEW, VIEW + table)).problems == []


def test_unrendered_widget_missing_image_and_traceback_are_problems(tmp_path):
    body = (f'<div class="cell_output">{VIEW}</div><div class="cell_output"><img src="gone.png"></div>'
            '<div class="cell_output">Traceback (most recent call last): boom</div>'
            '<div class="cell_output">&lt;Figure size 640x480 with 1 Axes&gt;</div>')
    page, html = page_with(tmp_path, body)
    problems = inspect_page(page, html, html).problems
    assert any("widget views did not render" in p for p in problems)
    assert any("image missing: 'gone.png'" in p for p in problems)
    assert any("traceback" in p for p in problems)
    assert any("figure printed as text" in p for p in problems)


def test_expectations_flag_pages_with_too_few_plots(tmp_path):
    page, html = page_with(tmp_path, "<p>no outputs</p>")
    report = inspect_page(page, html, html)
    check_expectations(report, parse_expectations(["chapter=images:2,widgets:1"])["chapter"])
    assert report.problems == ["expected at least 2 images, found 0", "expected at least 1 widgets, found 0"]


def test_dollar_amounts_rendered_as_maths_are_a_problem(tmp_path):
    body = ('<p>cost <em>less than <span class="math notranslate nohighlight">\\(500* with the API; '
            '*less than \\)</span>100</em></p><p><span class="math notranslate nohighlight">\\(x^2\\)</span></p>')
    page, html = page_with(tmp_path, body)
    problems = inspect_page(page, html, html).problems
    [problem] = problems  # the real formula x^2 is no problem
    assert problem.startswith("dollar amounts rendered as maths") and "500* with the API" in problem


def test_a_plot_without_a_caption_is_a_problem(tmp_path):
    page, html = page_with(tmp_path, '<div class="cell_output"><img src="plot.png"></div>')
    assert [p for p in inspect_page(page, html, html).problems if "without a caption" in p]


def test_progress_bars_and_the_trainers_log_table_are_problems(tmp_path):
    for text in ("kept:  40%|####      | 2/5 [00:03<00:04,  1.2s/it]", "greedy replies: 3/4 [01:02<00:20, 20.1s/batch]",
                 "Step Training Loss Validation Loss 1 No log 2.31"):
        page, html = page_with(tmp_path, f'<div class="cell_output"><pre>{text}</pre></div>')
        assert [p for p in inspect_page(page, html, html).problems if p.startswith("progress-bar")], text
    state = '<script type="application/vnd.jupyter.widget-state+json">{"m": {"model_name": "FloatProgressModel"}}</script>'
    page, html = page_with(tmp_path, f'<div class="cell_output"><pre>40% of the records</pre></div>{state}')
    assert inspect_page(page, html, html).problems == ["a progress-bar widget saved in the page (make book sets "
                                                       "ALPACA_NB_PROGRESS=0)"]


def test_a_page_with_outputs_must_link_the_line_wrapping_stylesheet(tmp_path):
    page, html = page_with(tmp_path, '<div class="cell_output"><pre>a long line</pre></div>', head="")
    assert inspect_page(page, html, html).problems == [
        "the page does not link cells.css: long lines would scroll sideways"]


def test_every_widget_control_either_acts_in_the_page_or_says_it_needs_a_kernel(tmp_path):
    """The check uses each control: an acting widget's controls change what it shows; a kernel widget says so with
    the command; an unmarked ipywidget's slider, inert in a static page, is a problem."""
    import ipywidgets

    from alpaca_nb.data import load_seed_tasks
    from alpaca_nb.safety import moderate
    from alpaca_nb.widgets import moderation_widget, seed_browser_widget
    from browser import headless_chromium
    from check_built_book import use_widgets
    from static_page import static_page

    widgets = [seed_browser_widget(load_seed_tasks()), moderation_widget(moderate, "hello"),
               ipywidgets.IntSlider(3, description="unmarked")]
    page = static_page(widgets, tmp_path)
    driver = headless_chromium()
    try:
        acting, problems = use_widgets(driver, page, views=3)
    finally:
        driver.quit()
    assert acting == 1
    assert len(problems) >= 1 and all("does not say it needs a kernel" in problem for problem in problems)
    assert any("unmarked" in problem for problem in problems)
