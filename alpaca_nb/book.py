"""The book's build settings that differ between copies of the repository: where it lives online.

A rendered page can link to its source and offer a launch button (Binder) only when the book knows its
repository. The shipped ``_config.yml`` names none, so the pages carry no dead links; a fork builds with
``make book BOOK_REPOSITORY=https://github.com/OWNER/REPO``, which runs ``python -m alpaca_nb.book`` to write
a copy of ``_config.yml`` with the repository and the buttons switched on.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["config_with_repository", "main", "repository_settings"]

BINDERHUB_URL = "https://mybinder.org"
# Binder builds GitHub and GitLab repositories by owner and name, from binder/ (the laptop profile, set up by the
# same `make setup`); the button opens the page's chapter in JupyterLab, as a notebook (jupytext). Colab is left out:
# it opens .ipynb files, and the chapters are MyST-markdown notebooks (each page offers its executed .ipynb for
# download instead).
_REPOSITORY = re.compile(r"https://(github\.com|gitlab\.com)/[\w.-]+/[\w.-]+")


def repository_settings(url: str, branch: str = "main") -> dict[str, Any]:
    """Return the ``_config.yml`` sections that link each page to ``url`` and offer a Binder launch button."""
    url = url.rstrip("/").removesuffix(".git")
    if not _REPOSITORY.fullmatch(url):
        raise ValueError(f"BOOK_REPOSITORY={url!r}: give the repository as https://github.com/OWNER/REPO "
                         "(or https://gitlab.com/OWNER/REPO), the form Binder can build")
    return {
        "repository": {"url": url, "branch": branch},
        "launch_buttons": {"notebook_interface": "jupyterlab", "binderhub_url": BINDERHUB_URL},
        "html": {"use_repository_button": True},
    }


def config_with_repository(config_path: str | Path, url: str, branch: str = "main") -> str:
    """Return ``config_path``'s YAML with the repository settings merged in, every other setting kept."""
    import yaml

    config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    for section, values in repository_settings(url, branch).items():
        config[section] = {**(config.get(section) or {}), **values}
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alpaca_nb.book", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the book's _config.yml")
    parser.add_argument("repository", help="https://github.com/OWNER/REPO")
    parser.add_argument("--branch", default="main")
    parser.add_argument("--out", required=True, help="where to write the configuration with the repository")
    args = parser.parse_args(argv)
    try:
        text = config_with_repository(args.config, args.repository, args.branch)
    except ValueError as error:
        print(f"alpaca_nb.book: {error}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
