"""What the chapters run, through the recipe: chapter 2's generation and its funnels, chapter 4's fine-tune.

The stage modules (``selfinstruct``, ``train``) know nothing of the recipe that strings the stages together; the
chapters ask here, and this asks ``reproduce`` for the stages (each run only when it is not complete for its
inputs), so that the book and ``alpaca-nb reproduce`` share their work. A chapter that needs another's results
(chapter 3 reads chapter 2's runs; chapters 5 and 6 use chapter 4's model) gets them here, run first if missing.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alpaca_nb import reproduce, selfinstruct
from alpaca_nb.llm import Endpoint

if TYPE_CHECKING:  # train imports torch: the generation chapters need not
    from alpaca_nb.train import BookData, TrainConfig, TrainResult

__all__ = ["BookFineTune", "BookGeneration", "book_fine_tune_dir", "book_main_run", "ensure_book_fine_tune",
           "ensure_book_generation", "run_book_fine_tune", "run_book_generation"]


# --------------------------------------------------------------------------- chapter 2: generation


def book_main_run(profile: Any) -> Path:
    """Return the folder of chapter 2's live run, which chapters 3 and 4 read: the recipe's ``generate`` stage."""
    return reproduce.recipe_dir(profile) / "generate"


@dataclass(frozen=True)
class BookGeneration:
    """Chapter 2's runs: every funnel's folder (all on the same first prompts), the live run, and the wall time
    of each phase."""

    funnels: dict[str, Path]  # funnel name -> folder
    live_run: Path
    live_seconds: float  # the live run alone, from the first request to the target
    compare_seconds: float  # the other funnels, on the live run's first prompts


def run_book_generation(profile: Any) -> BookGeneration:
    """Run chapter 2 afresh: the live run (the recipe's ``generate`` stage, the profile's funnel) to
    ``generate_instructions`` kept or ``generate_max_requests``, then every other funnel for
    ``generate_compare_requests`` requests on the same prompts. The live funnel's column is the live run's first
    requests (prompts depend only on the request number, so nothing is asked twice), continued in that column's
    own folder when the live run reached its target sooner.
    """
    root = profile.run_dir("self-instruct")
    shutil.rmtree(root, ignore_errors=True)  # every build measures afresh: chapter 2's own comparison runs ...
    reproduce.remove_stage_folder(book_main_run(profile))  # ... and the recipe's generate stage (refused if not one)
    live = selfinstruct.live_funnel(profile)
    started = time.perf_counter()
    reproduce.ensure_stage(profile, "generate")
    live_seconds = time.perf_counter() - started
    selfinstruct.copy_first_requests(book_main_run(profile), root / live.folder, profile.generate_compare_requests)
    funnels = selfinstruct.book_funnels(profile)

    def compare(funnel: selfinstruct.Funnel, teacher: Endpoint) -> None:
        selfinstruct.generate(teacher, 10**9, root / funnel.folder, budget_usd=profile.generate_budget_usd,
                              concurrency=profile.generate_concurrency, sampling=funnel.sampling,
                              constraint=funnel.constraint, max_requests=profile.generate_compare_requests,
                              progress=False)

    # The funnels run side by side, sharing the server's slots; each has its own folder, ledger and hook. The
    # live funnel's column asks only what its copy lacks.
    started = time.perf_counter()
    with selfinstruct.teacher_endpoint(profile) as teacher, concurrent.futures.ThreadPoolExecutor(len(funnels)) as pool:
        for done in [pool.submit(compare, funnel, teacher.copy()) for funnel in funnels]:
            done.result()
    return BookGeneration({funnel.name: root / funnel.folder for funnel in funnels}, book_main_run(profile),
                          live_seconds, time.perf_counter() - started)


def ensure_book_generation(profile: Any) -> Path:
    """Return chapter 2's live-run folder, running chapter 2's generation first if the live run is not complete
    or a funnel's run is not there (chapter 3 executed on its own)."""
    funnel_folders = [profile.run_dir("self-instruct") / funnel.folder for funnel in selfinstruct.book_funnels(profile)]
    if not ((book_main_run(profile) / reproduce.MANIFEST).is_file()
            and all((folder / "requests.jsonl").is_file() for folder in funnel_folders)):
        return run_book_generation(profile).live_run
    return book_main_run(profile)


# --------------------------------------------------------------------------- chapter 4: the fine-tune


def book_fine_tune_dir(profile: Any) -> Path:
    """Return the run folder of chapter 4's fine-tune (the recipe's ``fine_tune`` stage), whose final model
    chapters 5 and 6 use."""
    return reproduce.recipe_dir(profile) / "fine_tune" / "run"


@dataclass(frozen=True)
class BookFineTune:
    data: BookData
    config: TrainConfig
    result: TrainResult


def run_book_fine_tune(profile: Any) -> BookFineTune:
    """Return chapter 4's fine-tune: the recipe's ``sft_data`` and ``fine_tune`` stages in the profile's recipe
    folder (chapter 2's kept records topped up with real ones), each run unless it is complete for its inputs."""
    from alpaca_nb.train import load_result, profile_config, read_book_data

    reproduce.ensure_stage(profile, "fine_tune")
    data = read_book_data(reproduce.recipe_dir(profile) / "sft_data")
    config = profile_config(profile, str(book_fine_tune_dir(profile)), data)
    return BookFineTune(data, config, load_result(config.output_dir))


def ensure_book_fine_tune(profile: Any) -> Path:
    """Return chapter 4's fine-tuned model folder, running the recipe's stages up to the fine-tune if needed."""
    from alpaca_nb.train import FINAL_DIR

    reproduce.ensure_stage(profile, "fine_tune")
    return book_fine_tune_dir(profile) / FINAL_DIR
