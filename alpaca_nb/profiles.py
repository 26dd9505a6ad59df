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

__all__ = ["Profile", "ProfileError", "current_profile", "load_profile", "smoke_mode"]

PROFILE_NAMES = ("laptop", "cluster")


class ProfileError(ValueError):
    """An unknown profile name or a malformed profiles file."""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device: str
    chat_model: str
    base_model: str
    alpaca_asset: str
    max_new_tokens: int
    table_rows: int
    teacher_base_url: str
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
    generate_budget_usd: float
    ledger_requests: int
    finetune_asset: str
    finetune_examples: int
    finetune_eval_examples: int
    finetune_max_steps: int
    eval_instructions: int
    eval_max_new_tokens: int
    probe_max_new_tokens: int
    eval_probes: int
    truthfulqa_questions: int
    judge_base_url: str
    judge_model: str
    judge_calibration_pairs: int
    judge_budget_usd: float
    moderation_base_url: str
    watermark_prompts: int
    watermark_max_tokens: int
    smoke: bool = False

    def run_dir(self, stage: str) -> Path:
        """Return the folder in the user cache where the chapters keep this profile's run of ``stage``."""
        from alpaca_nb.data import cache_dir

        return cache_dir() / "runs" / (f"{self.name}-smoke" if self.smoke else self.name) / stage

    def as_rows(self) -> list[tuple[str, str]]:
        """Return (setting, value) pairs for display, naming the embedded model where a field is empty."""
        embedded = {"teacher_base_url": "embedded llama.cpp server", "judge_base_url": "embedded llama.cpp server",
                    "moderation_base_url": "offline checker (alt-profanity-check and rules)"}
        return [(key, str(value) if value != "" else embedded.get(key, "embedded SmolLM2-135M-Instruct"))
                for key, value in asdict(self).items()]


def _table() -> dict:
    return tomllib.loads(files("alpaca_nb").joinpath("profiles.toml").read_text(encoding="utf-8"))


def smoke_mode() -> bool:
    """Return True when ``ALPACA_NB_SMOKE`` asks for the seconds-long configuration."""
    return os.environ.get("ALPACA_NB_SMOKE", "") not in ("", "0")


def load_profile(name: str, smoke: bool = False) -> Profile:
    """Return the named profile, with the [smoke] sizes laid over it when ``smoke``."""
    table = _table()
    if name not in PROFILE_NAMES:
        raise ProfileError(f"unknown profile {name!r} (ALPACA_NB_PROFILE); choose one of: {', '.join(PROFILE_NAMES)}")
    settings = dict(table[name])
    known = {field.name for field in fields(Profile)}
    unknown = set(settings) - known
    missing = known - set(settings) - {"name", "smoke"}
    if unknown or missing:
        raise ProfileError(f"profiles.toml, [{name}]: unknown setting(s) {sorted(unknown)}, missing setting(s) {sorted(missing)}")
    profile = Profile(name=name, **settings)
    return replace(profile, smoke=True, **table.get("smoke", {})) if smoke else profile


def current_profile() -> Profile:
    """Return the profile chosen by ``ALPACA_NB_PROFILE`` and ``ALPACA_NB_SMOKE``."""
    return load_profile(os.environ.get("ALPACA_NB_PROFILE", "laptop") or "laptop", smoke=smoke_mode())
