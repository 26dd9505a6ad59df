"""Run profiles (laptop or cluster): the model names, data and sizes every chapter reads.

Taught in book/intro.md. ``ALPACA_NB_PROFILE`` picks the profile (default ``laptop``);
``ALPACA_NB_SMOKE=1`` shrinks its sizes so each chapter executes in seconds (used by the tests).

The *stand-in overlay* replaces where a profile runs, never how: the endpoints, model ids, device and data
file named in ``STAND_INS`` may each be set by an environment variable, ``ALPACA_NB_`` + the setting's name in
capitals. An instructor points the cluster profile at their own vLLM or llama-server this way, e.g.::

    ALPACA_NB_PROFILE=cluster ALPACA_NB_TEACHER_BASE_URL=http://gpu-node:8000/v1 \
    ALPACA_NB_TEACHER_MODEL=meta-llama/Llama-3.1-70B-Instruct jupyter-book build .

and CI rehearses the cluster profile on a CPU (tests/test_rehearsal.py): the embedded llama-server as teacher
and judge, a tiny Llama saved locally as base and chat model, a moderation stub, ``ALPACA_NB_DEVICE=cpu``.
Everything else (which API, which funnel, LoRA or not, every branch a chapter takes) stays the profile's; the
sizes only through [smoke]. An empty variable counts as unset; a bad value is refused by name; a variable
named after a setting outside the overlay (``ALPACA_NB_EVAL_INSTRUCTIONS``) is refused too, since a size must
come from profiles.toml. The profile table (``Profile.as_rows``) names the variable beside each value it set.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from importlib.resources import files
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

__all__ = ["STAND_INS", "UNSET_MEANS", "Profile", "ProfileError", "cache_dir", "current_profile", "environment_stand_ins",
           "load_profile", "profile_table", "smoke_mode"]

PROFILE_NAMES = ("laptop", "cluster")
ENV_PREFIX = "ALPACA_NB_"


class ProfileError(ValueError):
    """An unknown profile name or a malformed profiles file."""


def cache_dir() -> Path:
    """Return the user cache folder (``$ALPACA_NB_CACHE_DIR``, else ``~/.cache/alpaca_nb``): the profiles' runs and
    the data's downloads. Here, below ``data``, which re-exports it."""
    return Path(os.environ.get("ALPACA_NB_CACHE_DIR") or Path.home() / ".cache" / "alpaca_nb").expanduser()


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
    stand_ins: tuple[str, ...] = ()  # the settings the stand-in overlay set (STAND_INS), in its order

    def run_dir(self, stage: str) -> Path:
        """Return the folder in the user cache where the chapters keep this profile's run of ``stage``."""
        return cache_dir() / "runs" / (f"{self.name}-smoke" if self.smoke else self.name) / stage

    def model_label(self, setting: str) -> str:
        """Return how a page names the model of ``setting`` (chat_model, base_model, teacher_model, judge_model):
        "embedded model" where the profile runs the embedded SmolLM2, else the model's name (a local folder's
        own name), so that no page calls a cluster model the embedded one."""
        if setting not in ("chat_model", "base_model", "teacher_model", "judge_model"):
            raise ValueError(f"setting={setting!r}: expected chat_model, base_model, teacher_model or judge_model")
        embedded = {"teacher_model": self.teacher_base_url is None, "judge_model": self.judge_base_url is None}
        value = getattr(self, setting)
        if embedded.get(setting, value is None):
            return "embedded model"
        return Path(value).name if Path(value).expanduser().is_dir() else value

    def fine_tune_caveat(self) -> str:
        """Return what the pages print beside the fine-tune's figures: that it is the embedded 135M model, offline,
        not Alpaca-7B (laptop), else which base model was fine-tuned."""
        if self.base_model is None:
            return "offline, the embedded 135M model: not Alpaca-7B"
        return f"{self.model_label('base_model')} fine-tuned"

    def as_rows(self) -> list[tuple[str, str]]:
        """Return (setting, value) pairs for display, saying what an unset (None) setting means and naming the
        environment variable behind each stand-in."""
        rows = []
        for key, value in asdict(self).items():
            if key == "stand_ins":
                continue
            shown = UNSET_MEANS[key] if value is None else str(value)
            rows.append((key, f"{shown} (stand-in: {ENV_PREFIX}{key.upper()})" if key in self.stand_ins else shown))
        return rows


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


# The stand-in overlay: where a profile runs (endpoints, model ids, device, data file), each settable by
# ALPACA_NB_<SETTING>; what each value must be.
STAND_INS = {
    "device": "a torch device: cpu, cuda, cuda:1, mps ... (the cluster's cuda on a CPU: placement only)",
    "chat_model": "a Hugging Face model id or a local model folder",
    "base_model": "a Hugging Face model id or a local model folder",
    "teacher_base_url": "an OpenAI-compatible API's base URL, http(s)://host[:port]/v1",
    "teacher_model": "the teacher's model name at that URL",
    "judge_base_url": "an OpenAI-compatible API's base URL, http(s)://host[:port]/v1",
    "judge_model": "the judge's model name at that URL",
    "moderation_base_url": "the base URL of an endpoint with OpenAI's POST /moderations",
    "alpaca_asset": "an Alpaca-format asset of alpaca_nb.data.ASSETS: alpaca_data, alpaca_sample, alpaca_gpt4_demo",
    "finetune_asset": "an Alpaca-format asset of alpaca_nb.data.ASSETS: alpaca_data, alpaca_sample, alpaca_gpt4_demo",
}
ALPACA_FORMAT_ASSETS = ("alpaca_data", "alpaca_sample", "alpaca_gpt4_demo")


def environment_stand_ins(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the stand-in overlay that ``ALPACA_NB_<SETTING>`` variables ask for (setting -> value, empty ones
    left out); ProfileError for a variable named after a profile setting outside the overlay."""
    environ = os.environ if environ is None else environ
    chosen = {key: environ[ENV_PREFIX + key.upper()].strip() for key in STAND_INS
              if environ.get(ENV_PREFIX + key.upper(), "").strip()}
    outside = sorted(ENV_PREFIX + field.name.upper() for field in fields(Profile)
                     if field.name not in STAND_INS and field.name not in ("name", "smoke", "stand_ins")
                     and environ.get(ENV_PREFIX + field.name.upper(), "").strip())
    if outside:
        raise ProfileError(f"{', '.join(outside)}: not a stand-in setting (sizes and behaviour come from "
                           f"profiles.toml and its [smoke] overlay); the environment may set only "
                           f"{', '.join(ENV_PREFIX + key.upper() for key in STAND_INS)}")
    return chosen


def _checked_stand_in(key: str, value: str) -> str:
    """Return ``value`` for stand-in ``key`` when it is usable, else raise ProfileError naming the variable."""
    variable = f"{ENV_PREFIX}{key.upper()}={value!r}"
    if key == "device":
        import torch

        try:
            torch.device(value)
        except RuntimeError as error:
            raise ProfileError(f"{variable}: not a torch device ({error}); expected {STAND_INS[key]}") from None
    elif key.endswith("_base_url"):
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ProfileError(f"{variable}: expected {STAND_INS[key]}")
        value = value.rstrip("/")
    elif key.endswith("_asset"):
        if value not in ALPACA_FORMAT_ASSETS:
            raise ProfileError(f"{variable}: expected {STAND_INS[key]}")
    elif key in ("chat_model", "base_model") and value.startswith(("/", ".", "~")):
        if not (Path(value).expanduser() / "config.json").is_file():
            raise ProfileError(f"{variable}: no model folder there (no config.json); expected {STAND_INS[key]}")
    return value


def profile_table() -> dict:
    """Return profiles.toml as read: one table per profile, and the [smoke] overlay."""
    return tomllib.loads(files("alpaca_nb").joinpath("profiles.toml").read_text(encoding="utf-8"))


def smoke_mode() -> bool:
    """Return True when ``ALPACA_NB_SMOKE`` asks for the seconds-long configuration."""
    return os.environ.get("ALPACA_NB_SMOKE", "") not in ("", "0")


def load_profile(name: str, smoke: bool = False, stand_ins: Mapping[str, str] | None = None) -> Profile:
    """Return the named profile, with the [smoke] sizes laid over it when ``smoke``, then the stand-in overlay:
    ``stand_ins`` (setting -> value), by default what the ``ALPACA_NB_<SETTING>`` variables say
    (``environment_stand_ins``)."""
    table = profile_table()
    if name not in PROFILE_NAMES:
        raise ProfileError(f"unknown profile {name!r} (ALPACA_NB_PROFILE); choose one of: {', '.join(PROFILE_NAMES)}")
    settings = {**dict.fromkeys(UNSET_MEANS), **table[name]}  # a setting left out is None
    known = {field.name for field in fields(Profile)}
    unknown = set(settings) - known
    missing = known - set(settings) - {"name", "smoke", "stand_ins"}
    if unknown or missing:
        raise ProfileError(f"profiles.toml, [{name}]: unknown setting(s) {sorted(unknown)}, missing setting(s) {sorted(missing)}")
    for key in UNSET_MEANS:
        if settings[key] in ("", 0):  # the old sentinels: "" and 0 no longer mean "unset"
            raise ProfileError(f"profiles.toml, [{name}], {key} = {settings[key]!r}: leave the setting out for "
                               f"{UNSET_MEANS[key]}")
    profile = Profile(name=name, **settings)
    if smoke:
        profile = replace(profile, smoke=True, **table.get("smoke", {}))
    overlay = environment_stand_ins() if stand_ins is None else dict(stand_ins)
    outside = sorted(set(overlay) - set(STAND_INS))
    if outside:
        raise ProfileError(f"stand-ins {outside}: not stand-in settings; the overlay may set only "
                           f"{', '.join(STAND_INS)}")
    checked = {key: _checked_stand_in(key, value) for key, value in overlay.items()}
    return replace(profile, **checked, stand_ins=tuple(key for key in STAND_INS if key in checked))


def current_profile() -> Profile:
    """Return the profile chosen by ``ALPACA_NB_PROFILE`` and ``ALPACA_NB_SMOKE``."""
    return load_profile(os.environ.get("ALPACA_NB_PROFILE", "laptop") or "laptop", smoke=smoke_mode())
