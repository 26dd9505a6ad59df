"""Supervised fine-tuning data as Alpaca trained on it: templates, tokenization, label masking, the data mix.

Taught in chapter 3 (token counts) and chapter 4 (book/04_fine_tuning.md). The templates are byte-for-byte
stanford_alpaca train.py's PROMPT_DICT. The tokenization follows upstream (prompt tokens labelled -100,
target = output + EOS, 512 tokens at most) but fixes its silent defects: a prompt that fills the whole
length is dropped and counted instead of becoming an example with no label, a truncated example still ends
in EOS, and the prompt/response boundary is exact (see ``tokenize_example``). The laptop recipe's data mix
and Stanford's JSON format are here too. Batching is in ``batching``, the files for other trainers in
``export``, the replies before and after a fine-tune in ``evaluate``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alpaca_nb.data import AlpacaRecord, load_alpaca_data
from alpaca_nb.jsonl import write_text_atomically
from alpaca_nb.progress import progress_bar

__all__ = [
    "DataMix", "IGNORE_INDEX", "PROMPT_INPUT", "PROMPT_NO_INPUT", "SFTReport", "build_dataset", "ensure_pad_token",
    "export_stanford_json", "format_example", "format_prompt", "import_stanford_json", "instruction_text", "mix_records",
    "repeats_itself", "token_label_rows", "tokenize_example",
]

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and so every HF causal LM loss) skips

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the upstream field name
    """Return the Alpaca prompt: the with-input template when ``input`` is non-empty, as upstream decides."""
    if input != "":
        return PROMPT_INPUT.format_map({"instruction": instruction, "input": input})
    return PROMPT_NO_INPUT.format_map({"instruction": instruction})


def instruction_text(instruction: str, input: str) -> str:  # noqa: A002 - the upstream field name
    """Return an instruction as one message: the instruction, then its input (if any) after a blank line."""
    return f"{instruction}\n\n{input}" if input.strip() else instruction


def format_example(record: object, eos_token: str) -> tuple[str, str]:
    """Return (prompt, target) for a record with instruction/input/output: target = output + EOS, as upstream."""
    return format_prompt(record.instruction, record.input), f"{record.output}{eos_token}"


# --------------------------------------------------------------------------- tokenization and label masking


def _encode_example(
    instruction: str, input: str, output: str, tokenizer: PreTrainedTokenizerBase, max_length: int,  # noqa: A002
    train_on_input: bool,
) -> tuple[dict[str, list[int]] | None, bool]:
    """Return (example or None, whether truncation cut it): the work behind ``tokenize_example``."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: the model could never learn where a response ends")
    # The prompt gets the tokenizer's default special tokens (a BOS for LLaMA), as upstream's tokenization does.
    prompt_ids = tokenizer(format_prompt(instruction, input))["input_ids"]
    if len(prompt_ids) >= max_length:
        return None, False  # no target token would survive truncation: upstream kept it with zero labels
    # The target is tokenized on its own, not as part of prompt + output: BPE can merge the prompt's last ":"
    # with an output starting with '"' or '-' (7 of the 100 real records), which moves the label boundary
    # and teaches a token the model never sees at inference, where the prompt is tokenized alone.
    target_ids = tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = prompt_ids + target_ids
    truncated = len(input_ids) > max_length
    if truncated:
        # Upstream's truncation cut the EOS off, so long examples taught the model never to stop.
        input_ids = input_ids[:max_length - 1] + [tokenizer.eos_token_id]
    labels = list(input_ids) if train_on_input else [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids):]
    return {"input_ids": input_ids, "labels": labels}, truncated


def tokenize_example(
    instruction: str, input: str, output: str, tokenizer: PreTrainedTokenizerBase,  # noqa: A002
    max_length: int = 512, train_on_input: bool = False,
) -> dict[str, list[int]] | None:
    """Return {"input_ids", "labels"} for one Alpaca example, or None when its prompt leaves no room for a target.

    As upstream: source = ``format_prompt(...)``, target = output + EOS, prompt positions labelled
    ``IGNORE_INDEX`` (unless ``train_on_input``), ``max_length`` tokens at most. Unlike upstream: a prompt of
    ``max_length`` tokens or more gives None (upstream kept an example that trains nothing); a truncated
    example still ends in EOS; the target is tokenized separately, so the label boundary is exactly the end
    of the prompt and the token ids are those the model sees at inference (chapter 4).
    """
    example, _ = _encode_example(instruction, input, output, tokenizer, max_length, train_on_input)
    return example


@dataclass
class SFTReport:
    """What ``build_dataset`` kept, dropped and truncated, and how many tokens the loss sees."""

    examples: int
    kept: int
    dropped_prompt_too_long: int
    truncated: int
    target_tokens: int
    total_tokens: int
    max_length: int = 0
    dropped_indices: tuple[int, ...] = ()  # positions in the input records, to inspect what was lost
    truncated_indices: tuple[int, ...] = ()

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """Return one sentence saying what was kept, dropped and truncated, and why."""
        share = self.target_tokens / self.total_tokens if self.total_tokens else 0.0
        return (f"kept {self.kept} of {self.examples} examples; dropped {self.dropped_prompt_too_long} whose prompt "
                f"alone fills max_length={self.max_length} (no response token would remain); truncated "
                f"{self.truncated} to max_length, each still ending in EOS; {self.total_tokens} tokens, "
                f"{self.target_tokens} of them labelled ({share:.0%})")


def token_label_rows(record: Any, tokenizer: PreTrainedTokenizerBase, max_length: int = 512) -> list[dict[str, Any]]:
    """Return one row per token of a record as trained: token text, token_id, label, learned (chapter 4's viewer).

    A record whose prompt fills ``max_length`` is dropped by ``build_dataset``; its prompt tokens are shown,
    none learned.
    """
    example = tokenize_example(record.instruction, record.input, record.output, tokenizer, max_length=max_length)
    if example is None:
        input_ids = tokenizer(format_prompt(record.instruction, record.input))["input_ids"][:max_length]
        example = {"input_ids": input_ids, "labels": [IGNORE_INDEX] * len(input_ids)}
    return [{"token": tokenizer.decode([token_id]), "token_id": token_id, "label": label,
             "learned": label != IGNORE_INDEX}
            for token_id, label in zip(example["input_ids"], example["labels"])]


def build_dataset(
    records: Iterable[Any], tokenizer: PreTrainedTokenizerBase, max_length: int = 512, train_on_input: bool = False,
) -> tuple[list[dict[str, list[int]]], SFTReport]:
    """Return (tokenized examples, report) for records with instruction/input/output, in their order (chapter 4)."""
    records = list(records)
    examples: list[dict[str, list[int]]] = []
    dropped: list[int] = []
    truncated: list[int] = []
    # progress_bar waits 2 s: a bar only for work long enough to watch (the 52K file), not under every small call.
    for index, record in enumerate(progress_bar(records, desc="tokenize", unit="example")):
        example, was_truncated = _encode_example(record.instruction, record.input, record.output, tokenizer,
                                                 max_length, train_on_input)
        if example is None:
            dropped.append(index)
            continue
        if was_truncated:
            truncated.append(index)
        examples.append(example)
    report = SFTReport(
        examples=len(records), kept=len(examples), dropped_prompt_too_long=len(dropped), truncated=len(truncated),
        target_tokens=sum(_labelled_count(example) for example in examples),
        total_tokens=sum(len(example["input_ids"]) for example in examples),
        max_length=max_length, dropped_indices=tuple(dropped), truncated_indices=tuple(truncated),
    )
    return examples, report


def _labelled_count(example: dict[str, list[int]]) -> int:
    return sum(1 for label in example["labels"] if label != IGNORE_INDEX)


# --------------------------------------------------------------------------- pad token


def ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Return True when a "[PAD]" token had to be added (embeddings resized, new rows = mean of old rows).

    Upstream's ``smart_tokenizer_and_embedding_resize``: LLaMA had no pad token. A tokenizer that already
    has one (the embedded SmolLM2 pads with ``<|im_end|>``) is reused and nothing changes (False).
    """
    if tokenizer.pad_token_id is not None:
        return False
    vocabulary_before = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    rows_before = _full_shape(model.get_input_embeddings().weight)[0]
    if len(tokenizer) > rows_before:
        # mean_resizing=False: the new rows are overwritten with the exact mean just below, as upstream does.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _set_new_rows_to_mean(model, vocabulary_before, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return True


def _full_shape(weight: torch.Tensor) -> torch.Size:
    """Return a weight's shape, also when DeepSpeed ZeRO-3 has partitioned it (``weight.shape`` is then (0,))."""
    return getattr(weight, "ds_shape", weight.shape)


def _set_new_rows_to_mean(model: PreTrainedModel, first_new: int, end: int) -> None:
    """Set embedding rows [first_new, end) of the input and output embeddings to the mean of the rows before.

    Under DeepSpeed ZeRO-3 the model may arrive partitioned (transformers 5.24 loads it inside ``zero.Init``
    whenever a stage-3 DeepSpeed config is active, whatever accelerate's ``zero3_init_flag`` says): each rank then
    holds an empty ``weight`` and writing rows into it does nothing, without an error. The rows are gathered,
    set on rank 0 and scattered back (``modifier_rank=0``). A resized embedding is a plain tensor again
    (transformers builds the new one outside ``zero.Init``) and needs no gathering.
    """
    weights = [model.get_input_embeddings().weight]
    if model.get_output_embeddings() is not None:
        weights.append(model.get_output_embeddings().weight)  # the same tensor when embeddings are tied: harmless
    partitioned = [weight for weight in weights if hasattr(weight, "ds_id")]
    if partitioned:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
    else:
        gathered = contextlib.nullcontext()
    with gathered, torch.no_grad():
        for weight in weights:
            weight[first_new:end] = weight[:first_new].mean(dim=0, keepdim=True)


# --------------------------------------------------------------------------- loops


def repeats_itself(text: str, words: int = 4, times: int = 3) -> bool:
    """Return True when some run of ``words`` words occurs ``times`` times or more: a reply caught in a loop.

    List numbers are ignored first, so "4. Email Marketing: 5. Email Marketing:" counts as a repeat.
    """
    tokens = re.sub(r"\b\d+[.)]", " ", text).split()
    runs = Counter(tuple(tokens[start:start + words]) for start in range(len(tokens) - words + 1))
    return bool(runs) and max(runs.values()) >= times



# --------------------------------------------------------------------------- the laptop mix and Stanford's JSON


@dataclass(frozen=True)
class DataMix:
    """The fine-tuning set of the laptop recipe: generated records first, topped up with real ones."""

    records: tuple[AlpacaRecord, ...]
    generated: int  # how many of ``records`` came from our own self-instruct run
    real: int  # how many were topped up from the real Alpaca file
    real_source: str
    empty_outputs: int = 0  # generated records left out because their output is empty
    looping_outputs: int = 0  # generated records left out because their output repeats itself

    def summary(self) -> str:
        """Return one sentence stating the mix."""
        reasons = [f"{count} with {what}" for count, what in
                   ((self.empty_outputs, "an empty output"), (self.looping_outputs, "a looping output")) if count]
        left_out = f" ({' and '.join(reasons)} left out)" if reasons else ""
        return (f"{len(self.records)} records: {self.generated} generated by our self-instruct run{left_out}, "
                f"{self.real} real ones from {self.real_source}")


def mix_records(generated: Sequence[Any], real: Sequence[Any], size: int, real_source: str) -> DataMix:
    """Return up to ``size`` records: every generated one (up to ``size``), then real ones to fill (chapter 4).

    A generated record with an empty output, or one caught in a loop (``repeats_itself``), is left out and
    counted: upstream's filters keep such blocks (the 52K file holds some), but trained on, the first
    teaches the model to end before answering and the second to repeat itself instead of ending.
    """
    answered = [r for r in generated if r.output.strip()]
    unlooped = [r for r in answered if not repeats_itself(r.output)]
    ours = [AlpacaRecord(r.instruction, r.input, r.output) for r in unlooped][:size]
    top_up = [AlpacaRecord(r.instruction, r.input, r.output) for r in real][:max(0, size - len(ours))]
    return DataMix(tuple(ours + top_up), len(ours), len(top_up), real_source,
                   len(generated) - len(answered), len(answered) - len(unlooped))


def export_stanford_json(records: Iterable[Any], path: str | os.PathLike) -> Path:
    """Return the path written: a JSON array of {"instruction", "input", "output"} like alpaca_data.json."""
    rows = [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records]
    # indent=4 as upstream's jdump; UTF-8 kept readable rather than \u-escaped (both parse the same).
    return write_text_atomically(path, json.dumps(rows, indent=4, ensure_ascii=False) + "\n")


def import_stanford_json(path: str | os.PathLike, *, allow_empty_output: bool = False) -> list[AlpacaRecord]:
    """Return the records of a Stanford-format JSON file, validated by ``load_alpaca_data`` (errors name the field)."""
    return load_alpaca_data(path, allow_empty_output=allow_empty_output)


