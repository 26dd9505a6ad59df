"""The demo's two safety measures, as Alpaca's release had them: a content filter and a watermark.

Taught in chapter 6. The content filter is ``content_filter``'s (re-exported here): ``moderate`` asks OpenAI's
moderation endpoint when a client is given, and otherwise an offline checker: alt-profanity-check's linear SVM
(offensive language, its model inside its wheel) plus the short rule set in ``moderation_rules.toml`` for
categories the classifier does not cover.

The watermark is Kirchenbauer et al. (2023), "A Watermark for Large Language Models", through transformers'
own implementation (``WatermarkingConfig``, ``WatermarkDetector``), at the paper's settings: a green list of
gamma = 0.25 of the vocabulary, seeded by the previous token ("lefthash", context width 1, the paper's
main scheme), whose logits get delta = 2.0 added before the temperature divides them, as in the authors'
code (``watermarking_config`` says why transformers is given delta / T), and detection at z = 4. Only
generated tokens are scored, and a repeated bigram counts once, as the authors advise.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from alpaca_nb.content_filter import (
    LABELLED_SETS, MODERATION_MODEL, OFFENSIVE_THRESHOLD, OFFLINE_CHECKER, PROMPT_KINDS, ErrorRates, LabelledPrompt,
    Moderation, ModerationError, checker_error_rates, checker_mistakes, load_labelled_prompts, moderate,
    moderation_client, parse_rules, profile_filter,
)
from alpaca_nb.plots import plot_watermark
from alpaca_nb.stats import roc_auc

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DETECTION_Z",
    "ErrorRates",
    "Generation",
    "LabelledPrompt",
    "Moderation",
    "ModerationError",
    "WatermarkExperiment",
    "WatermarkVerdict",
    "attack_table",
    "checker_error_rates",
    "checker_mistakes",
    "detect_watermark",
    "detection_lengths",
    "detection_table",
    "edit_tokens",
    "generate_watermarked",
    "load_labelled_prompts",
    "moderate",
    "moderation_client",
    "paper_comparison",
    "parse_rules",
    "perplexity",
    "profile_filter",
    "plot_watermark",
    "read_experiment",
    "run_watermark_experiment",
    "watermark_settings",
    "watermarking_config",
    "write_experiment",
]

GAMMA = 0.25          # the paper's green-list fraction
DELTA = 2.0           # the paper's logit bias
DETECTION_Z = 4.0     # the paper's threshold (transformers defaults to 3)
SAMPLING_TEMPERATURE = 0.7  # the authors' --sampling_temp in the runs behind the paper's Table 2
SEEDING_SCHEME = "lefthash"
EXPERIMENT_FILE = "experiment.json"  # a watermark experiment as the recipe's watermark stage writes it


# --------------------------------------------------------------------------- the watermark


def watermarking_config(temperature: float | None):
    """Return the paper's watermark as transformers' ``WatermarkingConfig`` for sampling at ``temperature``.

    Gamma 0.25, lefthash, and delta = 2 added to the model's logits *before* temperature, as the authors' code
    does: their ``WatermarkLogitsProcessor`` goes in ``generate(logits_processor=...)``, which transformers runs
    before the temperature warper (lm-watermarking ``demo_watermark.py`` and ``experiments/run_watermarking.py``,
    ``--sampling_temp 0.7``, the setting of the paper's Table 2). transformers 5.24 applies its own watermark
    *after* the warpers (``generation/utils.py``, ``_get_logits_processor``: ``TemperatureLogitsWarper`` is
    appended at lines 1618-1619, the watermark processor at 1652-1659, "Watermarking should be after all logits
    processing is finished (see #34630)"), so it is handed ``delta / T``: softmax((l + delta) / T) is
    softmax(l / T + delta / T). ``None`` (or 0) means greedy or beam search, where no temperature applies.
    Left as it differs: top-k and top-p cut the vocabulary before transformers' watermark, after the authors'.
    """
    from transformers import WatermarkingConfig

    bias = DELTA / temperature if temperature else DELTA
    return WatermarkingConfig(greenlist_ratio=GAMMA, bias=bias, seeding_scheme=SEEDING_SCHEME, context_width=1)


def watermark_settings() -> dict[str, Any]:
    """Return the watermark's parameters as a recipe stage records them: a change to any reruns the stage."""
    return {"gamma": GAMMA, "delta": DELTA, "delta_applied": "before temperature (transformers' bias = delta / T)",
            "seeding_scheme": SEEDING_SCHEME, "context_width": 1, "detection_z": DETECTION_Z,
            "sampling_temperature": SAMPLING_TEMPERATURE}


@dataclass(frozen=True)
class Generation:
    """One sampled continuation: its prompt, the generated token ids only (no prompt, no padding) and text."""

    prompt: str
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    watermarked: bool


def generate_watermarked(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, watermark: bool = True,
    temperature: float = SAMPLING_TEMPERATURE, min_new_tokens: int = 0, seed: int = 0, batch_size: int = 64,
    add_special_tokens: bool = True,
) -> list[Generation]:
    """Sample a continuation of each prompt (multinomial, ``temperature``), watermarked unless ``watermark`` is off.

    ``min_new_tokens`` holds EOS back, so that detection can be measured at a fixed length. Prompts are used
    as written (a chat-templated prompt already holds its special tokens: pass ``add_special_tokens=False``).
    Seeded, so a rerun of the same batch samples the same text.
    """
    if temperature <= 0:
        raise ValueError("temperature must be above 0: the watermark is measured on sampled text")
    config = watermarking_config(temperature) if watermark else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generations = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch_prompts = list(prompts[start:start + batch_size])
            batch = tokenizer(batch_prompts, return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens).to(model.device)
            torch.manual_seed(seed + start)
            with torch.inference_mode():
                output = model.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                        watermarking_config=config, pad_token_id=pad_id)
            width = batch["input_ids"].shape[1]
            for index, (prompt, row) in enumerate(zip(batch_prompts, output[:, width:].tolist())):
                prompt_ids = tuple(batch["input_ids"][index][batch["attention_mask"][index].bool()].tolist())
                ids = _until_end(row, tokenizer.eos_token_id, pad_id)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                generations.append(Generation(prompt, prompt_ids, ids, text, watermark))
    finally:
        tokenizer.padding_side = side
    return generations


def _until_end(row: list[int], eos_id: int, pad_id: int) -> tuple[int, ...]:
    end = next((index for index, token in enumerate(row) if token in (eos_id, pad_id)), len(row))
    return tuple(row[:end])


@dataclass(frozen=True)
class WatermarkVerdict:
    """The detector's reading of one text: z-score and p-value of its green-token count, and the verdict."""

    z_score: float
    p_value: float
    tokens_scored: int
    green_fraction: float
    watermarked: bool  # z_score > threshold


def detect_watermark(
    text_or_ids: str | Sequence[int], tokenizer: Any, model_config: Any, device: str | torch.device = "cpu",
    z_threshold: float = DETECTION_Z,
) -> WatermarkVerdict:
    """Return whether ``text_or_ids`` (generated tokens only, never the prompt) carries the paper's watermark.

    ``device`` must be the device that generated: the green lists come from a ``torch.Generator`` there.
    A text is re-tokenised without special tokens; ids are safer, as re-tokenising can split text otherwise.
    """
    ids = tokenizer(text_or_ids, add_special_tokens=False)["input_ids"] if isinstance(text_or_ids, str) \
        else list(text_or_ids)
    if len(ids) < 2:
        raise ValueError(f"{len(ids)} tokens: the detector needs at least 2 (one of context, one to score)")
    detector = _detector(model_config, str(device))
    out = detector(torch.tensor([ids], device=device), z_threshold=z_threshold, return_dict=True)
    return WatermarkVerdict(float(out.z_score[0]), float(out.p_value[0]), int(out.num_tokens_scored[0]),
                            float(out.green_fraction[0]), bool(out.prediction[0]))


_DETECTORS: dict[tuple[int, int | None, str], Any] = {}


def _detector(model_config: Any, device: str) -> Any:
    """Return one detector per (what it reads from the model config, device): its green-list cache is kept.

    Keyed by content, never by ``id(model_config)``: a freed config's id can be reused by another model's, and
    ``resize_token_embeddings`` changes ``vocab_size`` in place. The detector reads gamma, the hash key, the
    seeding scheme and the context width; never the bias, so detection is the same whatever the temperature.
    """
    from transformers import WatermarkDetector

    key = _detector_key(model_config, device)
    if key not in _DETECTORS:
        _DETECTORS[key] = WatermarkDetector(model_config, device, watermarking_config(None),
                                            ignore_repeated_ngrams=True)
    return _DETECTORS[key]


def _detector_key(model_config: Any, device: str) -> tuple[int, int | None, str]:
    """Return the fields of ``model_config`` that ``WatermarkDetector`` reads (vocabulary size, first token)."""
    first = model_config.decoder_start_token_id if model_config.is_encoder_decoder else model_config.bos_token_id
    return model_config.vocab_size, first, device


def edit_tokens(ids: Sequence[int], fraction: float, vocab_size: int, seed: int = 0) -> tuple[int, ...]:
    """Return ``ids`` with ``fraction`` of its positions, chosen at random, replaced by random vocabulary tokens.

    The simplest edit attack: cheaper than the paper's T5 span replacement, and as blind to meaning.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction}: must be between 0 and 1")
    generator = torch.Generator().manual_seed(seed)
    edited = list(ids)
    count = round(fraction * len(edited))
    positions = torch.randperm(len(edited), generator=generator)[:count].tolist()
    replacements = torch.randint(vocab_size, (count,), generator=generator).tolist()
    for position, token in zip(positions, replacements):
        edited[position] = token
    return tuple(edited)


def perplexity(model: Any, generation: Generation) -> float:
    """Return the perplexity of ``generation``'s tokens given its prompt, under ``model`` (unwatermarked)."""
    prompt_ids = list(generation.prompt_ids)
    ids = torch.tensor([prompt_ids + list(generation.token_ids)], device=model.device)
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    targets = ids[0, len(prompt_ids):]
    loss = torch.nn.functional.cross_entropy(logits, targets)
    return math.exp(float(loss))


# --------------------------------------------------------------------------- chapter 6's measurement


PAPER_LENGTHS = (25, 50, 100, 200)  # tokens at which chapter 6 measures detection; the paper's T is 200


def detection_lengths(longest: int) -> tuple[int, ...]:
    """Return the lengths of ``PAPER_LENGTHS`` below ``longest``, then ``longest`` itself."""
    return tuple(sorted({length for length in PAPER_LENGTHS if length < longest} | {longest}))


@dataclass(frozen=True)
class WatermarkExperiment:
    """Each prompt sampled with and without the watermark, scored at several lengths and after edits."""

    marked: tuple[Generation, ...]
    plain: tuple[Generation, ...]
    z_marked: dict[int, tuple[float, ...]]  # by length: the z-score of each watermarked text's first N tokens
    z_plain: dict[int, tuple[float, ...]]   # the same for the unwatermarked texts
    attack_z: dict[float, tuple[float, ...]]  # by fraction of tokens replaced: z of each watermarked text, whole
    perplexity_marked: tuple[float, ...]    # under the model without the watermark
    perplexity_plain: tuple[float, ...]
    temperature: float
    seconds: float  # wall time of the whole measurement: sampling, detection, the attack and the perplexities
    threshold: float = DETECTION_Z


def run_watermark_experiment(
    model: Any, tokenizer: Any, prompts: Sequence[str], lengths: Sequence[int] = (25, 50, 100, 200),
    edit_fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.5), temperature: float = SAMPLING_TEMPERATURE, seed: int = 0,
    add_special_tokens: bool = False,
) -> WatermarkExperiment:
    """Sample every prompt to ``max(lengths)`` tokens with and without the watermark, then detect on prefixes.

    EOS is held back to the longest length, so every text is scored at every length; the edit attack and the
    perplexities use whole texts. ``device`` for detection is the model's.
    """
    from alpaca_nb.progress import progress_bar

    started = time.perf_counter()
    longest = max(lengths)
    texts = {watermark: generate_watermarked(model, tokenizer, prompts, longest, watermark=watermark,
                                             temperature=temperature, min_new_tokens=longest, seed=seed,
                                             add_special_tokens=add_special_tokens)
             for watermark in progress_bar((True, False), desc="sampling", unit="set")}

    def z_scores(sequences: Sequence[Sequence[int]]) -> tuple[float, ...]:
        return tuple(detect_watermark(ids, tokenizer, model.config, model.device).z_score for ids in sequences)

    z_marked = {n: z_scores([g.token_ids[:n] for g in texts[True]]) for n in progress_bar(lengths, desc="detecting")}
    z_plain = {n: z_scores([g.token_ids[:n] for g in texts[False]]) for n in lengths}
    vocab = model.config.vocab_size
    attack_z = {fraction: z_scores([edit_tokens(g.token_ids, fraction, vocab, seed=seed + i)
                                    for i, g in enumerate(texts[True])])
                for fraction in progress_bar(edit_fractions, desc="edit attack")}
    return WatermarkExperiment(
        tuple(texts[True]), tuple(texts[False]), z_marked, z_plain, attack_z,
        tuple(perplexity(model, g) for g in texts[True]), tuple(perplexity(model, g) for g in texts[False]),
        temperature, time.perf_counter() - started,
    )


def write_experiment(experiment: WatermarkExperiment, path: str | os.PathLike) -> None:
    """Write ``experiment`` as JSON (texts with their token ids, every z-score, the perplexities)."""
    from dataclasses import asdict

    from alpaca_nb.jsonl import write_text_atomically

    write_text_atomically(path, json.dumps(asdict(experiment), ensure_ascii=False) + "\n")


def read_experiment(path: str | os.PathLike) -> WatermarkExperiment:
    """Return the experiment ``write_experiment`` wrote to ``path``."""
    from alpaca_nb.data import DataError

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        texts = {key: tuple(Generation(item["prompt"], tuple(item["prompt_ids"]), tuple(item["token_ids"]),
                                       item["text"], item["watermarked"]) for item in raw[key])
                 for key in ("marked", "plain")}
        by_length = {key: {int(n): tuple(z) for n, z in raw[key].items()} for key in ("z_marked", "z_plain")}
        return WatermarkExperiment(
            texts["marked"], texts["plain"], by_length["z_marked"], by_length["z_plain"],
            {float(fraction): tuple(z) for fraction, z in raw["attack_z"].items()},
            tuple(raw["perplexity_marked"]), tuple(raw["perplexity_plain"]), raw["temperature"], raw["seconds"],
            raw["threshold"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path}: not a watermark experiment ({type(error).__name__}: {error})") from None


def detection_table(experiment: WatermarkExperiment) -> "pd.DataFrame":
    """Return one row per length: the detection rate on watermarked text and the false-positive rate on plain."""
    import pandas as pd

    rows = []
    for length, marked in experiment.z_marked.items():
        plain = experiment.z_plain[length]
        rows.append({"tokens": length, "texts": len(marked),
                     "detected (true positives)": _share_above(marked, experiment.threshold),
                     "false positives": _share_above(plain, experiment.threshold),
                     "median z, watermarked": _median(marked), "median z, plain": _median(plain),
                     "ROC AUC": roc_auc(marked, plain)})
    return pd.DataFrame(rows).set_index("tokens")


def attack_table(experiment: WatermarkExperiment) -> "pd.DataFrame":
    """Return one row per edit fraction: how many watermarked texts the detector still finds, and their median z."""
    import pandas as pd

    longest = max(experiment.z_marked)
    rows = [{"tokens replaced": 0.0, "detected": _share_above(experiment.z_marked[longest], experiment.threshold),
             "median z": _median(experiment.z_marked[longest])}]
    rows += [{"tokens replaced": fraction, "detected": _share_above(z, experiment.threshold), "median z": _median(z)}
             for fraction, z in experiment.attack_z.items()]
    return pd.DataFrame(rows).set_index("tokens replaced")


def _share_above(values: Sequence[float], threshold: float) -> float:
    return sum(value > threshold for value in values) / len(values)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# Kirchenbauer et al. (2023), arXiv:2301.10226, Table 2: OPT-1.3B, T = 200 tokens, gamma 0.25, delta 2.0,
# multinomial sampling, detection at z = 4. Their runs sampled at temperature 0.7, delta added before it
# (lm-watermarking, experiments/README.md and run_watermarking.py).
PAPER_SOURCE = "Kirchenbauer et al. (2023), A Watermark for Large Language Models, arXiv:2301.10226, Table 2"
PAPER_TRUE_POSITIVE_RATE = 0.994
PAPER_TOKENS = 200


def paper_comparison(detection: "pd.DataFrame") -> str:
    """Return a sentence setting this run's detection at its longest length beside the paper's at 200 tokens."""
    longest = int(detection.index.max())
    row = detection.loc[longest]
    return (f"Here, {longest} tokens: {row['detected (true positives)']:.1%} of watermarked texts detected at "
            f"z > {DETECTION_Z:g}, {row['false positives']:.1%} of plain texts flagged ({int(row['texts'])} of each). "
            f"The paper: {PAPER_TRUE_POSITIVE_RATE:.1%} detected at {PAPER_TOKENS} tokens with OPT-1.3B, multinomial "
            f"sampling at temperature {SAMPLING_TEMPERATURE}, gamma {GAMMA}, delta {DELTA} ({PAPER_SOURCE}).")
