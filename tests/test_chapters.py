"""Execute every chapter in _toc.yml, the same code the book runs, in the seconds-long smoke mode.

A broken chapter fails `make test`; `make book` then executes the chapters at full size.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml
from myst_nb.core.read import read_myst_markdown_notebook
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def toc_files() -> list[str]:
    """Return the toc's files (root first), as paths relative to the repository root without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    entries = [toc["root"]]
    for chapter in toc.get("chapters", []):
        entries.append(chapter["file"])
    return entries


def notebooks() -> list[Path]:
    """Return the toc's executable pages (MyST notebooks with a kernelspec)."""
    pages = [ROOT / f"{entry}.md" for entry in toc_files()]
    return [page for page in pages if "kernelspec:" in page.read_text(encoding="utf-8")[:400]]


def test_every_toc_entry_exists():
    for entry in toc_files():
        assert (ROOT / f"{entry}.md").is_file(), f"_toc.yml names {entry}, which does not exist"


@pytest.mark.parametrize("page", notebooks(), ids=lambda page: page.stem)
def test_chapter_executes_in_smoke_mode(page, monkeypatch):
    monkeypatch.setenv("ALPACA_NB_SMOKE", "1")
    notebook = read_myst_markdown_notebook(page.read_text(encoding="utf-8"), path=page)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(page.parent)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    assert nbformat.validate(notebook) is None
