"""The demo's content filter: OpenAI's moderation endpoint (the cluster profile) or the offline checker (laptop:
alt-profanity-check's classifier plus the rules in ``moderation_rules.toml``), one :class:`Moderation` verdict per
text, and the filter's error rates on labelled prompts. Taught in chapter 6, beside the watermark of ``safety``.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache, partial
from importlib import resources
from typing import Any, Callable, Sequence

__all__ = [
    "ErrorRates", "LabelledPrompt", "Moderation", "ModerationError", "checker_error_rates", "checker_mistakes",
    "load_labelled_prompts", "moderate", "moderation_client", "parse_rules", "profile_filter",
]

MODERATION_MODEL = "omni-moderation-latest"
OFFENSIVE_THRESHOLD = 0.5  # alt-profanity-check's own decision boundary (its ``predict``)


class ModerationError(ValueError):
    """A moderation file or answer that cannot be used: names the file, line and field."""


@dataclass(frozen=True)
class Moderation:
    """One text's moderation: flagged when any category is, each category's flag and score, and who answered."""

    flagged: bool
    categories: dict[str, bool]
    scores: dict[str, float]
    checker: str  # "openai:omni-moderation-latest" or "offline:alt-profanity-check+rules"

    def flagged_categories(self) -> list[str]:
        return [name for name, flagged in self.categories.items() if flagged]


def moderation_client(profile: Any) -> Any:
    """Return an ``openai.OpenAI`` client for the profile's moderation endpoint, or None for the offline checker."""
    if profile.moderation_base_url is None:
        return None
    import openai

    return openai.OpenAI(base_url=profile.moderation_base_url)  # the key comes from OPENAI_API_KEY


def profile_filter(profile: Any) -> Callable[[str], Moderation]:
    """Return the profile's content filter: ``moderate`` bound to its moderation endpoint, or offline."""
    return partial(moderate, client=moderation_client(profile))


def moderate(text: str, client: Any = None, model: str = MODERATION_MODEL) -> Moderation:
    """Return ``text``'s moderation: OpenAI's endpoint through ``client`` (an ``openai.OpenAI``), else offline."""
    if client is not None:
        return _moderate_api(text, client, model)
    return _moderate_offline(text)


def _moderate_api(text: str, client: Any, model: str) -> Moderation:
    response = client.moderations.create(model=model, input=text)
    result = response.results[0]
    categories = result.categories.model_dump(by_alias=True)
    scores = result.category_scores.model_dump(by_alias=True)
    return Moderation(bool(result.flagged), {k: bool(v) for k, v in categories.items()},
                      {k: float(scores.get(k) or 0.0) for k in categories}, f"openai:{response.model or model}")


OFFLINE_CHECKER = "offline:alt-profanity-check+rules"


def _moderate_offline(text: str) -> Moderation:
    from profanity_check import predict_prob

    offensive = float(predict_prob([text])[0])
    categories = {"offensive": offensive >= OFFENSIVE_THRESHOLD}
    scores = {"offensive": offensive}
    for category, patterns in _rules().items():
        matched = any(pattern.search(text) for pattern in patterns)
        categories[category], scores[category] = matched, float(matched)
    return Moderation(any(categories.values()), categories, scores, OFFLINE_CHECKER)


@lru_cache(maxsize=1)
def _rules() -> dict[str, tuple[re.Pattern, ...]]:
    source = resources.files("alpaca_nb") / "moderation_rules.toml"
    return parse_rules(source.read_text(encoding="utf-8"), source.name)


def parse_rules(text: str, name: str) -> dict[str, tuple[re.Pattern, ...]]:
    """Return a rule file's patterns by category, compiled; a bad one is named by file, category and position."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModerationError(f"{name}: not TOML ({exc})") from exc
    rules = {}
    for category, entry in table.items():
        patterns = entry.get("patterns") if isinstance(entry, dict) else None
        if not isinstance(patterns, list):
            raise ModerationError(f"{name}: [{category}] needs a list of strings named 'patterns'")
        compiled = []
        for index, pattern in enumerate(patterns):
            try:
                compiled.append(re.compile(pattern, re.IGNORECASE))
            except (re.error, TypeError) as exc:
                raise ModerationError(f"{name}: [{category}] patterns[{index}]: {exc}") from exc
        rules[category] = tuple(compiled)
    return rules


@dataclass(frozen=True)
class LabelledPrompt:
    text: str
    harmful: bool
    kind: str  # "harmful", "benign" or "benign_alarming" (benign, with words such as kill or shoot)


# The development set was written with the rules and shaped them; the test set was written afterwards by
# someone who never saw the rules, and the rules were not changed after it was scored.
LABELLED_SETS = {"development": "moderation_prompts.jsonl", "test": "moderation_test_prompts.jsonl"}
PROMPT_KINDS = {"harmful": True, "benign": False, "benign_alarming": False}


def load_labelled_prompts(which: str = "test") -> list[LabelledPrompt]:
    """Return one of chapter 6's labelled prompt sets (``LABELLED_SETS``), checked field by field."""
    if which not in LABELLED_SETS:
        raise ValueError(f"which={which!r}: expected one of {sorted(LABELLED_SETS)}")
    source = resources.files("alpaca_nb") / LABELLED_SETS[which]
    prompts = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ModerationError(f"{source.name}:{number}: not JSON ({exc.msg})") from exc
        for field, kind in (("text", str), ("harmful", bool), ("kind", str)):
            if not isinstance(row.get(field), kind):
                raise ModerationError(f"{source.name}:{number}: field {field!r} must be a {kind.__name__}")
        if PROMPT_KINDS.get(row["kind"]) is not row["harmful"]:
            raise ModerationError(f"{source.name}:{number}: field 'kind' is {row['kind']!r} with harmful="
                                  f"{row['harmful']}: expected one of {PROMPT_KINDS}")
        prompts.append(LabelledPrompt(row["text"], row["harmful"], row["kind"]))
    return prompts


@dataclass(frozen=True)
class ErrorRates:
    """A checker's mistakes on a labelled set: flagged benign prompts and missed harmful ones."""

    false_positives: int
    benign: int
    false_negatives: int
    harmful: int

    @property
    def false_positive_rate(self) -> float | None:
        return self.false_positives / self.benign if self.benign else None

    @property
    def false_negative_rate(self) -> float | None:
        return self.false_negatives / self.harmful if self.harmful else None


def checker_error_rates(prompts: Sequence[LabelledPrompt], verdicts: Sequence[Moderation]) -> ErrorRates:
    """Return the false-positive and false-negative counts of ``verdicts`` against the prompts' labels."""
    if len(prompts) != len(verdicts):
        raise ValueError(f"{len(prompts)} prompts but {len(verdicts)} verdicts")
    pairs = list(zip(prompts, verdicts))
    return ErrorRates(
        false_positives=sum(v.flagged for p, v in pairs if not p.harmful), benign=sum(not p.harmful for p in prompts),
        false_negatives=sum(not v.flagged for p, v in pairs if p.harmful), harmful=sum(p.harmful for p in prompts),
    )


def checker_mistakes(prompts: Sequence[LabelledPrompt], verdicts: Sequence[Moderation]) -> list[dict[str, str]]:
    """Return one row per prompt the checker got wrong: the prompt, its label, and what the checker flagged."""
    return [{"prompt": p.text, "label": p.kind, "flagged as": ", ".join(v.flagged_categories()) or "(allowed)"}
            for p, v in zip(prompts, verdicts, strict=True) if p.harmful != v.flagged]
