"""alpaca_nb.book: the shipped configuration has no repository and no launch buttons; a fork's has both."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alpaca_nb.book import config_with_repository, main, repository_settings

CONFIG = Path(__file__).resolve().parents[1] / "_config.yml"


def sphinx_options(config_path: Path) -> dict:
    """Return the html_theme_options and the repository Jupyter Book derives from ``config_path``."""
    from jupyter_book.config import get_final_config

    config, _ = get_final_config(user_yaml=config_path, cli_config={"latex_individualpages": False},
                                 sourcedir=config_path.parent)
    return config["html_theme_options"]


def launch_providers(theme_options: dict) -> list[str]:
    """The launch providers sphinx-book-theme would offer (its add_launch_buttons needs one of these)."""
    buttons = theme_options.get("launch_buttons") or {}
    return [key for key in ("binderhub_url", "jupyterhub_url", "thebe", "colab_url", "jupyterlite_url")
            if buttons.get(key)]


def test_the_shipped_book_links_to_no_repository_and_offers_no_launch_button():
    options = sphinx_options(CONFIG)
    assert not options.get("repository_url") and not options.get("use_repository_button")
    assert launch_providers(options) == []


def test_a_fork_gets_its_repository_link_and_a_binder_button(tmp_path):
    out = tmp_path / "_config.yml"
    assert main([str(CONFIG), "https://github.com/someone/alpaca-nb.git", "--out", str(out)]) == 0
    options = sphinx_options(out)
    assert options["repository_url"] == "https://github.com/someone/alpaca-nb"
    assert options["use_repository_button"] is True and launch_providers(options) == ["binderhub_url"]
    shipped, written = yaml.safe_load(CONFIG.read_text()), yaml.safe_load(out.read_text())
    assert written["sphinx"] == shipped["sphinx"] and written["execute"] == shipped["execute"]
    assert {key for key in written if written[key] != shipped.get(key)} == {"repository", "launch_buttons", "html"}


@pytest.mark.parametrize("url", ["github.com/someone/alpaca-nb", "https://github.com/someone",
                                 "https://example.org/someone/alpaca-nb"])
def test_a_repository_binder_cannot_build_is_refused_with_the_form_to_use(url, capsys, tmp_path):
    with pytest.raises(ValueError, match="https://github.com/OWNER/REPO"):
        repository_settings(url)
    assert main([str(CONFIG), url, "--out", str(tmp_path / "c.yml")]) == 2
    assert "OWNER/REPO" in capsys.readouterr().err and not (tmp_path / "c.yml").exists()


def test_the_written_config_keeps_the_shipped_html_settings(tmp_path):
    written = yaml.safe_load(config_with_repository(CONFIG, "https://gitlab.com/someone/alpaca-nb"))
    shipped = yaml.safe_load(CONFIG.read_text())
    assert written["html"] == {**shipped["html"], "use_repository_button": True}
