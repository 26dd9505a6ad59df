"""alpaca_nb.claims and the alpaca-nb command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alpaca_nb.claims import PAPER_CLAIMS, claim, claims_frame
from alpaca_nb.cli import main


def test_claims_hold_the_papers_figures():
    assert "90 versus 89" in claim("pairwise_eval").paper_says
    assert "$500" in claim("generation_cost").paper_says
    assert "Dodoma" in claim("hallucination").paper_says
    assert len(claims_frame()) == len(PAPER_CLAIMS)


def test_unknown_claim_lists_known_keys():
    with pytest.raises(KeyError, match="known: seed_tasks"):
        claim("nope")


def test_cli_assets_lists_pinned_urls(capsys):
    assert main(["assets"]) == 0
    output = capsys.readouterr().out
    assert "alpaca_data" in output and "52002" in output and "761dc5bfbdeeffa89b8bff5d038781a4055f796a" in output


def test_cli_prepare_reports_each_file_and_fails_when_one_is_missing(isolated_cache, monkeypatch, capsys):
    monkeypatch.setenv("ALPACA_NB_OFFLINE", "1")
    assert main(["prepare"]) == 1
    assert "seed_tasks         MISSING" in capsys.readouterr().err


def test_console_script_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "alpaca_nb.cli", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "prepare" in result.stdout


def test_cli_train_hands_every_option_to_the_trainer_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as finished:
        main(["train", "--help"])
    assert finished.value.code == 0 and "--output-dir" in capsys.readouterr().out
    # A configuration error comes back as exit status 2 with the fix, before any model is loaded.
    assert main(["train", "--output-dir", str(tmp_path), "--resume"]) == 2
    assert "holds no checkpoint-N folder to resume from" in capsys.readouterr().err


def test_claims_point_only_to_chapters_that_exist(tmp_path):
    (tmp_path / "03_costs.md").write_text("# 3")
    where = dict(zip([c.key for c in PAPER_CLAIMS], claims_frame(book_dir=tmp_path)["checked in"]))
    assert where["generation_cost"] == "Chapter 3, costs"
    assert where["finetune_cost"] == "Chapter 3, costs; chapter 4, fine-tuning"  # one of its pages exists
    assert where["pairwise_eval"] == "not checked yet (Chapter 5, evaluation is planned)"
