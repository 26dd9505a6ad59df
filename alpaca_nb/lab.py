"""`make lab` / `alpaca-nb lab`: the chapters run live in JupyterLab.

JupyterLab starts in the repository's ``book/`` folder with jupytext's "Jupytext Notebook" as the default viewer
of markdown files, so a click on a chapter (a MyST-markdown notebook) opens it as a notebook on this environment's
kernel, its widgets live. Saving writes the chapter's text back to its ``.md`` (outputs are not kept there);
``git checkout book/`` undoes a reader's edits. The chapters keep their stages' results where the book does (the
profile's folders in the user cache), so a chapter the book already ran shows its figures at once; ``--reset``
removes stages to run them afresh.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["DEFAULT_VIEWERS", "book_dir", "lab_command", "open_chapters_as_notebooks", "reset_stages", "run_lab"]

# JupyterLab's document-manager setting: which viewer a double-click uses per file type.
DEFAULT_VIEWERS = {"@jupyterlab/docmanager-extension:plugin": {
    "defaultViewers": {"markdown": "Jupytext Notebook", "myst": "Jupytext Notebook"}}}


def book_dir() -> Path:
    """Return the repository's ``book/`` folder; FileNotFoundError when the package was not installed from a clone."""
    folder = Path(__file__).resolve().parents[1] / "book"
    if not (folder / "01_seed_tasks.md").is_file():
        raise FileNotFoundError(f"no chapters in {folder}: `alpaca-nb lab` opens the repository's book/ folder; "
                                "install the package from a clone (make lab) or pass --book DIR")
    return folder


def open_chapters_as_notebooks(prefix: str | os.PathLike = sys.prefix) -> Path:
    """Write this environment's JupyterLab default (a file of its own in ``overrides.d``, other settings untouched)
    that opens markdown files as Jupytext notebooks; return its path."""
    path = Path(prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.d" / "alpaca-nb.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(DEFAULT_VIEWERS, indent=2) + "\n", encoding="utf-8")
    return path


def lab_command(book: str | os.PathLike, *, port: int, host: str = "127.0.0.1", open_browser: bool = True,
                token: str | None = None) -> list[str]:
    """Return the JupyterLab command line serving ``book`` (its token printed by JupyterLab unless given)."""
    command = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={Path(book).resolve()}",
               f"--ServerApp.ip={host}", f"--ServerApp.port={port}", f"--ServerApp.open_browser={open_browser}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--ServerApp.allow_root=True")  # containers and CI run as root; JupyterLab refuses it unasked
    return command + ([f"--IdentityProvider.token={token}"] if token is not None else [])


def reset_stages(profile: object, stages: Sequence[str]) -> list[Path]:
    """Delete these stages' folders in the profile's recipe folder (the chapters' shared results), each only if it
    is a stage folder; return what was deleted. The chapters that need them run them again."""
    from alpaca_nb.reproduce import recipe_dir, remove_stage_folder

    removed = []
    for stage in stages:
        folder = recipe_dir(profile) / stage
        if folder.exists():
            remove_stage_folder(folder)
            removed.append(folder)
    return removed


def run_lab(book: str | os.PathLike, *, port: int, host: str, open_browser: bool) -> None:
    """Become JupyterLab on ``book`` (exec: SIGTERM and Ctrl-C reach it, and it shuts its kernels down). Its kernels
    inherit this environment (``ALPACA_NB_SMOKE``, ``ALPACA_NB_PROFILE``...)."""
    open_chapters_as_notebooks()
    command = lab_command(book, port=port, host=host, open_browser=open_browser)
    os.execv(command[0], command)
