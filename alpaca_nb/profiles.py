"""Run profiles (laptop or cluster): the model names, data and sizes every chapter reads.

Taught in book/intro.md. ``ALPACA_NB_PROFILE`` picks the profile (default ``laptop``);
``ALPACA_NB_SMOKE=1`` shrinks its sizes so each chapter executes in seconds (used by the tests).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from importlib.resources import files
from pathlib import Path

__all__ = ["UNSET_MEANS", "Profile", "ProfileError", "current_profile", "load_profile", "profile_table", "smoke_mode"]

PROFILE_NAMES = ("laptop", "cluster")


class ProfileError(ValueError):
    """An unknown profile name or a malformed profiles file."""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device: str
    chat_model: str | None
    base_model: str | None
    alpaca_asset: str
    max_new_tokens: int
    table_rows: int
    teacher_base_url: str | None
    teacher_model: str
    server_parallel: int
    server_context: int
    generate_instructions: int
    generate_max_requests: int
    generate_max_tokens: int
    generate_temperature: float
    compare_temperature: float
    generate_format: str
    constrained_format: str
    generate_compare_requests: int
    generate_concurrency: int
    generate_budget_usd: float | None
    ledger_requests: int
    finetune_asset: str
    finetune_examples: int
    finetune_eval_examples: int
    finetune_max_steps: int | None
    eval_instructions: int
    eval_max_new_tokens: int
    probe_max_new_tokens: int
    eval_probes: int | None
    truthfulqa_questions: int | None
    judge_base_url: str | None
    judge_model: str
    judge_calibration_pairs: int
    judge_budget_usd: float | None
    moderation_base_url: str | None
    watermark_prompts: int
    watermark_max_tokens: int
    smoke: bool = False

    def run_dir(self, stage: str) -> Path:
        """Return the folder in the user cache where the chapters keep this profile's run of ``stage``."""
        from alpaca_nb.data import cache_dir

        return cache_dir() / "runs" / (f"{self.name}-smoke" if self.smoke else self.name) / stage

    def as_rows(self) -> list[tuple[str, str]]:
        """Return (setting, value) pairs for display, saying what an unset (None) setting means."""
        return [(key, UNSET_MEANS[key] if value is None else str(value)) for key, value in asdict(self).items()]


# A setting left out of profiles.toml is None; this is what None means for each that may be left out.
UNSET_MEANS = {
    "chat_model": "the embedded SmolLM2-135M-Instruct",
    "base_model": "the embedded SmolLM2-135M-Instruct",
    "teacher_base_url": "the embedded llama.cpp server",
    "generate_budget_usd": "no cap",
    "finetune_max_steps": "the preset's epochs",
    "eval_probes": "every probe of the shipped set",
    "truthfulqa_questions": "all 790 questions",
    "judge_base_url": "the embedded llama.cpp server",
    "judge_budget_usd": "no cap",
    "moderation_base_url": "the offline checker (alt-profanity-check and rules)",
}


def profile_table() -> dict:
    """Return profiles.toml as read: one table per profile, and the [smoke] overlay."""
    return tomllib.loads(files("alpaca_nb").joinpath("profiles.toml").read_text(encoding="utf-8"))


def smoke_mode() -> bool:
    """Return True when ``ALPACA_NB_SMOKE`` asks for the seconds-long configuration."""
    return os.environ.get("ALPACA_NB_SMOKE", "") not in ("", "0")


def load_profile(name: str, smoke: bool = False) -> Profile:
    """Return the named profile, with the [smoke] sizes laid over it when ``smoke``."""
    table = profile_table()
    if name not in PROFILE_NAMES:
        raise ProfileError(f"unknown profile {name!r} (ALPACA_NB_PROFILE); choose one of: {', '.join(PROFILE_NAMES)}")
    settings = {**dict.fromkeys(UNSET_MEANS), **table[name]}  # a setting left out is None
    known = {field.name for field in fields(Profile)}
    unknown = set(settings) - known
    missing = known - set(settings) - {"name", "smoke"}
    if unknown or missing:
        raise ProfileError(f"profiles.toml, [{name}]: unknown setting(s) {sorted(unknown)}, missing setting(s) {sorted(missing)}")
    for key in UNSET_MEANS:
        if settings[key] in ("", 0):  # the old sentinels: "" and 0 no longer mean "unset"
            raise ProfileError(f"profiles.toml, [{name}], {key} = {settings[key]!r}: leave the setting out for "
                               f"{UNSET_MEANS[key]}")
    profile = Profile(name=name, **settings)
    return replace(profile, smoke=True, **table.get("smoke", {})) if smoke else profile


def current_profile() -> Profile:
    """Return the profile chosen by ``ALPACA_NB_PROFILE`` and ``ALPACA_NB_SMOKE``."""
    return load_profile(os.environ.get("ALPACA_NB_PROFILE", "laptop") or "laptop", smoke=smoke_mode())
