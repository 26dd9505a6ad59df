"""The set-up's pins: the lock the suite passed with, used the same way by the Makefile and conda."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name} \??:?= *(.+)$", (REPO / "Makefile").read_text(), flags=re.MULTILINE)
    assert match, f"Makefile sets no {name}"
    return match.group(1).strip()


def locked_versions() -> dict[str, str]:
    lines = (REPO / "requirements.lock").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith(("#", " ")))


def test_the_lock_pins_the_packages_this_environment_runs():
    locked = locked_versions()
    for package in ("openai", "httpx", "transformers", "accelerate", "jupyter-book", "tiktoken", "numpy", "anywidget",
                    "jupyterlab", "jupytext"):
        assert locked[package] == version(package), package
    # torch is pinned by the set-up instead: the CPU wheel here, the CUDA wheel of that version on a cluster.
    assert "torch" not in locked


def test_conda_installs_the_same_pins_as_the_makefile():
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    [pip_section] = [entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict)]
    assert "-c requirements.lock" in pip_section
    assert makefile_variable("TORCH_SPEC") in pip_section
    assert makefile_variable("LOCK") == "requirements.lock"
    assert "$(LOCK_CONSTRAINT) -e \".[book,dev,demo,lab]\"" in (REPO / "Makefile").read_text()
    assert "-e .[book,dev,demo,lab]" in pip_section


def test_a_built_wheel_carries_the_package_data_files(tmp_path):
    """The probe set, the judge's template and the price and profile tables ship inside the wheel, not only
    in an editable checkout."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(root)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("alpaca_nb-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for data_file in ("probes.jsonl", "judge_template.txt", "prices.toml", "profiles.toml", "moderation_rules.toml",
                      "moderation_prompts.jsonl", "moderation_test_prompts.jsonl", "widgets_js/seed_browser.js",
                      "widgets_js/prompt_price.js", "widgets_js/recipe_cost.js", "widgets_js/static_widgets.css"):
        assert f"alpaca_nb/{data_file}" in names, data_file
