"""Write widgets into a static HTML page the way the book's pages load them (offline, no kernel), for tests that
check in Chromium what the published book's widgets do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ipywidgets.embed import embed_data

ROOT = Path(__file__).resolve().parents[1]
WIDGETS_JS = ROOT / "_widgets_js"
# The scripts _config.yml's nb_ipywidgets_js loads on every book page, in its order, and what they load; the book
# copies them all into one _static folder, and so does the page here.
SCRIPTS = [WIDGETS_JS / "require.js", ROOT / "book" / "_js" / "widget_paths.js", WIDGETS_JS / "embed-amd.js"]
LOADED = [WIDGETS_JS / "anywidget.js"]


def static_page(widgets: list, folder: Path) -> Path:
    """Return a page in ``folder`` holding ``widgets``' views and full state, loading the book's widget scripts."""
    missing = [script for script in SCRIPTS + LOADED if not script.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is missing: `make setup` fetches the widget JavaScript into _widgets_js/")
    static = folder / "_static"
    static.mkdir(parents=True, exist_ok=True)
    for script in SCRIPTS + LOADED:
        shutil.copy(script, static / script.name)
    data = embed_data(views=widgets, drop_defaults=False)
    scripts = "".join(f'<script src="_static/{script.name}"></script>' for script in SCRIPTS)
    views = "".join(f'<div class="widget-subarea"><script type="application/vnd.jupyter.widget-view+json">'
                    f'{_script_json(view)}</script></div>' for view in data["view_specs"])
    page = folder / "widgets.html"
    page.write_text(f'<!doctype html><html><head><meta charset="utf-8">{scripts}'
                    f'<link rel="stylesheet" href="{(ROOT / "book" / "_css" / "cells.css").as_uri()}">'
                    f'<script type="application/vnd.jupyter.widget-state+json">{_script_json(data["manager_state"])}</script>'
                    f'</head><body>{views}</body></html>', encoding="utf-8")
    return page


def _script_json(value: object) -> str:
    # JSON inside <script>: "</" would end the element early (what myst-nb's sanitize_script_content guards against).
    return json.dumps(value).replace("</", "<\\/")
