"""Supervised fine-tuning data as Alpaca trained on it: templates, tokenization, label masking, batching, exporters.

Taught in chapter 3 (token counts) and chapter 4 (book/04_fine_tuning.md). The templates are byte-for-byte
stanford_alpaca train.py's PROMPT_DICT. The tokenization follows upstream (prompt tokens labelled -100,
target = output + EOS, 512 tokens at most) but fixes its silent defects: a prompt that fills the whole
length is dropped and counted instead of becoming an example with no label, a truncated example still ends
in EOS, and the prompt/response boundary is exact (see ``tokenize_example``). Batching offers upstream's
right padding, length-grouped batches and padding-free packing (with ``enable_packed_attention`` so that
packing also pays on CPU); exporters write the data for TRL, LLaMA-Factory and axolotl; the chapter's
views (token labels, padding per strategy, replies before and after) are built here too.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from transformers import AttentionInterface, DataCollatorWithFlattening, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alpaca_nb.data import AlpacaRecord, DataError, jsonl_objects, load_alpaca_data
from alpaca_nb.jsonl import write_text_atomically
from alpaca_nb.progress import progress_bar

__all__ = [
    "AlpacaCollator", "DataMix", "IGNORE_INDEX", "PACKED_ATTENTION", "PROMPT_INPUT", "PROMPT_NO_INPUT", "Reply",
    "SFTReport", "axolotl_dataset_block", "build_dataset", "enable_packed_attention", "ensure_pad_token",
    "export_stanford_json", "export_trl_jsonl", "format_example", "format_prompt", "from_trl_prompt_completion",
    "greedy_replies", "import_stanford_json", "import_trl_jsonl", "invents_a_section", "length_grouped_batches",
    "llama_factory_dataset_info", "mix_records", "padded_tokens", "padding_by_strategy", "padding_free_collator",
    "plot_padding", "random_batches", "repeats_itself", "replies_table", "stop_table", "to_trl_prompt_completion",
    "token_label_rows", "tokenize_example",
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
    rows_before = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows_before:
        # mean_resizing=False: the new rows are overwritten with the exact mean just below, as upstream does.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _set_new_rows_to_mean(model, vocabulary_before, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return True


def _set_new_rows_to_mean(model: PreTrainedModel, first_new: int, end: int) -> None:
    """Set embedding rows [first_new, end) of the input and output embeddings to the mean of the rows before."""
    weights = [model.get_input_embeddings().weight]
    if model.get_output_embeddings() is not None:
        weights.append(model.get_output_embeddings().weight)  # the same tensor when embeddings are tied: harmless
    with torch.no_grad():
        for weight in weights:
            weight[first_new:end] = weight[:first_new].mean(dim=0, keepdim=True)


# --------------------------------------------------------------------------- batching


class AlpacaCollator:
    """Upstream's DataCollatorForSupervisedDataset: right padding to the longest example of the batch."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: call ensure_pad_token(model, tokenizer) first")
        self.pad_token_id = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Return input_ids (pad id), labels (-100) and attention_mask (0) padded on the right."""
        lengths = [len(feature["input_ids"]) for feature in features]
        width = self._padded_width(max(lengths))
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        # Built from the lengths, not from input_ids != pad id as upstream: when pad = EOS (SmolLM2), that
        # comparison would also hide each example's real EOS token.
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def _padded_width(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of
        return longest if not multiple else -(-longest // multiple) * multiple


def padding_free_collator() -> DataCollatorWithFlattening:
    """Return a collator packing a batch into one row with no padding and position ids restarting per example.

    Each example's first label becomes -100, so no token is trained to predict the next example's start.
    The model must get ``use_cache=False`` (``model.config.use_cache = False`` for Trainer): with a cache,
    transformers skips the packed-sequence mask and examples attend to the ones packed before them
    (``enable_packed_attention`` removes that trap and most of the attention cost).
    """
    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)


PACKED_ATTENTION = "alpaca_packed_sdpa"


def _packed_segments(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> list[int] | None:
    """Return the example lengths of one packed row (position ids restarting), or None for any other input."""
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return None  # a padded batch, a decoding step with a cache, or a single token: plain SDPA handles it
    starts = [0] + (torch.nonzero(position_ids[0, 1:] != position_ids[0, :-1] + 1).flatten() + 1).tolist()
    if len(starts) == 1:
        return None
    return [end - start for start, end in zip(starts, starts[1:] + [query.shape[2]])]


def _packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Return (attention output, None): causal SDPA run per packed example, plain SDPA for anything else."""
    lengths = _packed_segments(kwargs.get("position_ids"), query, key)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # One L x L masked attention over the packed row costs (sum of lengths)^2; per example it costs the sum of
    # squares, and each call can use the causal kernel, which skips the blocks above the diagonal.
    outputs = [
        sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)[0]
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    ]
    return torch.cat(outputs, dim=1), None


def enable_packed_attention(model: PreTrainedModel) -> PreTrainedModel:
    """Return ``model`` switched to attention computed per packed example (same results, far less work on CPU).

    With ``padding_free_collator`` the stock SDPA path attends over the whole packed row with a block-diagonal
    mask: its cost grows with the square of the row (8 examples of 200 tokens packed into 1,600 compute
    1,600² scores, 8 times the 8 x 200² that matter). This implementation splits the row where the position
    ids restart and runs causal SDPA on each example; padded batches and generation go through plain SDPA,
    unchanged. It also isolates the examples when a cache is present (the ``use_cache`` trap of
    ``padding_free_collator``). Measured by benchmarks/bench_sft.py: packed training steps 1.33x the
    upstream tokens/s with stock SDPA, 1.87x and 2.12x with this in two runs (chapter 4).
    """
    AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # padded batches keep SDPA's usual mask
    model.set_attn_implementation(PACKED_ATTENTION)
    return model


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0) -> list[list[int]]:
    """Return batches of indices of similar length, each index once, in shuffled order (longest batch first).

    As transformers' LengthGroupedSampler: shuffle, cut into mega-batches of ``50 * batch_size`` (fewer for
    small data, so there are about 4), sort each by length. The batch holding the longest example goes first
    so an out-of-memory error shows at step one, not hours later.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    generator = random.Random(seed)
    order = list(range(len(lengths)))
    generator.shuffle(order)
    megabatch_size = max(min(len(lengths) // (batch_size * 4), 50), 1) * batch_size
    batches = []
    for start in range(0, len(order), megabatch_size):
        megabatch = sorted(order[start:start + megabatch_size], key=lambda index: lengths[index], reverse=True)
        batches += [megabatch[i:i + batch_size] for i in range(0, len(megabatch), batch_size)]
    generator.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[index] for index in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def padding_by_strategy(lengths: Sequence[int], batch_size: int = 4, seed: int = 0) -> "pd.DataFrame":
    """Return, per batching strategy, the real, padding and computed tokens for examples of these lengths.

    Upstream: seeded random batches right-padded to their longest; length-grouped: ``length_grouped_batches``;
    padding-free: ``padding_free_collator``, which computes the real tokens only (chapter 4).
    """
    import pandas as pd

    upstream = random_batches(len(lengths), batch_size, seed=seed)
    grouped = length_grouped_batches(lengths, batch_size, seed=seed)
    real = sum(lengths)
    computed = {
        "upstream: random batches, right padding": padded_tokens(upstream, lengths),
        "length-grouped batches, right padding": padded_tokens(grouped, lengths),
        "padding-free packing": real,
    }
    return pd.DataFrame([{"strategy": name, "real tokens": real, "padding tokens": tokens - real,
                          "computed tokens": tokens, "padding share": (tokens - real) / tokens if tokens else 0.0}
                         for name, tokens in computed.items()]).set_index("strategy")


def random_batches(count: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Return batches of indices 0..count-1 in a seeded random order: upstream's sampler (no length grouping)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, count, batch_size)]


def padded_tokens(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> int:
    """Return the tokens computed when each batch is right-padded to its longest example."""
    return sum(max(lengths[index] for index in batch) * len(batch) for batch in batches if batch)


def plot_padding(padding: "pd.DataFrame"):
    """Return a bar chart of real and padding tokens per strategy (a ``padding_by_strategy`` table)."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 2.6), constrained_layout=True)
    names = list(padding.index)[::-1]  # barh draws bottom-up: keep upstream on top
    real, pad = padding.loc[names, "real tokens"], padding.loc[names, "padding tokens"]
    axis.barh(names, real, color="#66c2a5", label="real tokens")
    axis.barh(names, pad, left=real, color="#d9d9d9", label="padding")
    for name in names:
        row = padding.loc[name]
        axis.annotate(f" {row['padding share']:.0%} padding", (row["computed tokens"], name), va="center", fontsize=8)
    axis.set_xlabel("tokens computed per epoch")
    axis.set_xlim(0, padding["computed tokens"].max() * 1.25)
    axis.legend(fontsize=8, loc="lower right")
    return figure


# --------------------------------------------------------------------------- TRL prompt-completion


def to_trl_prompt_completion(records: Iterable[Any]) -> list[dict[str, str]]:
    """Return TRL prompt-completion rows: {"prompt": the Alpaca prompt, "completion": the output} (chapter 4)."""
    return [{"prompt": format_prompt(record.instruction, record.input), "completion": record.output}
            for record in records]


_NO_INPUT_HEAD, _NO_INPUT_TAIL = PROMPT_NO_INPUT.split("{instruction}")
_INPUT_HEAD, _INPUT_REST = PROMPT_INPUT.split("{instruction}")
_INPUT_SEPARATOR, _INPUT_TAIL = _INPUT_REST.split("{input}")


def _parse_prompt(prompt: str) -> tuple[str, str] | None:
    """Return (instruction, input) that ``format_prompt`` turns into ``prompt``, or None if it is no Alpaca prompt."""
    # The two templates differ from their first sentence on, so the head says which one was used.
    if prompt.startswith(_INPUT_HEAD) and prompt.endswith(_INPUT_TAIL):
        middle = prompt[len(_INPUT_HEAD):len(prompt) - len(_INPUT_TAIL)]
        instruction, separator, task_input = middle.partition(_INPUT_SEPARATOR)
        return (instruction, task_input) if separator and task_input else None
    if prompt.startswith(_NO_INPUT_HEAD) and prompt.endswith(_NO_INPUT_TAIL):
        return prompt[len(_NO_INPUT_HEAD):len(prompt) - len(_NO_INPUT_TAIL)], ""
    return None


def from_trl_prompt_completion(rows: Iterable[dict[str, str]]) -> list[AlpacaRecord]:
    """Return the Alpaca records behind TRL prompt-completion rows; DataError names the row that is not one."""
    records = []
    for index, row in enumerate(rows):
        # Exact for every record except one whose instruction itself contains "\n\n### Input:\n": the
        # template cannot tell that apart, and the split is made at the first occurrence.
        parsed = _parse_prompt(row["prompt"])
        if parsed is None:
            raise DataError(f"row {index}, field 'prompt': not an Alpaca prompt (neither template matches)")
        records.append(AlpacaRecord(instruction=parsed[0], input=parsed[1], output=row["completion"]))
    return records


# --------------------------------------------------------------------------- replies before and after


@dataclass(frozen=True)
class Reply:
    """One greedy reply to an Alpaca prompt, and whether the model ended it itself."""

    text: str
    new_tokens: int  # generated before the end-of-sequence token, or up to the cap
    stopped: bool  # the model emitted EOS before ``max_new_tokens``; False = cut by the cap


def _end_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Return every token id that ends generation: the tokenizer's EOS and the generation config's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    return ids | {tokenizer.eos_token_id}


def greedy_replies(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: Sequence[Any], max_new_tokens: int = 128,
    batch_size: int = 8,
) -> list[Reply]:
    """Return the model's greedy reply to each record's Alpaca prompt (no chat template: the fine-tuned format)."""
    prompts = [format_prompt(record.instruction, record.input) for record in records]
    return greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size)


def greedy_completions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 128,
    batch_size: int = 8, add_special_tokens: bool = True, show_progress: bool = True,
) -> list[Reply]:
    """Return the model's greedy continuation of each prompt, exactly as written (a template already applied).

    Batched with left padding, so every prompt ends where generation starts. A reply counts as stopped when
    an end id appears among its new tokens; a row that ended early is padded with the pad id afterwards,
    which is EOS for the embedded model, so the first end id is where the model stopped.
    """
    end_ids = _end_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[Reply] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in progress_bar(range(0, len(prompts), batch_size), desc="greedy replies", unit="batch",
                                  disable=not show_progress):
            batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens).to(model.device)
            with torch.inference_mode():
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            for row in output[:, batch["input_ids"].shape[1]:].tolist():
                end = next((index for index, token in enumerate(row) if token in end_ids), None)
                kept = row if end is None else row[:end]
                replies.append(Reply(tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept),
                                     end is not None))
    finally:
        tokenizer.padding_side = side
    return replies


def repeats_itself(text: str, words: int = 4, times: int = 3) -> bool:
    """Return True when some run of ``words`` words occurs ``times`` times or more: a reply caught in a loop.

    List numbers are ignored first, so "4. Email Marketing: 5. Email Marketing:" counts as a repeat.
    """
    tokens = re.sub(r"\b\d+[.)]", " ", text).split()
    runs = Counter(tuple(tokens[start:start + words]) for start in range(len(tokens) - words + 1))
    return bool(runs) and max(runs.values()) >= times


def invents_a_section(text: str) -> bool:
    """Return True when a reply writes a new "### ..." header (an Instruction, Response or Explanation of its own)."""
    return re.search(r"^\s*###", text, flags=re.MULTILINE) is not None


def stop_table(replies: dict[str, Sequence[Reply]], max_new_tokens: int) -> "pd.DataFrame":
    """Return one row per model: how many replies ended with EOS before the cap, why the others ran on (a loop
    or not), how many invented a ``###`` section, and how long the replies ran."""
    import pandas as pd

    rows = {}
    for name, model_replies in replies.items():
        stopped = sum(reply.stopped for reply in model_replies)
        cut = [reply for reply in model_replies if not reply.stopped]
        lengths = sorted(reply.new_tokens for reply in model_replies)
        rows[name] = {"replies": len(model_replies), "ended with EOS": stopped,
                      f"cut at {max_new_tokens} tokens": len(cut),
                      "of which looping": sum(repeats_itself(reply.text) for reply in cut),
                      "with an invented ### section": sum(invents_a_section(reply.text) for reply in model_replies),
                      "stop rate": stopped / len(model_replies) if model_replies else None,
                      "median tokens": lengths[len(lengths) // 2] if lengths else None}
    return pd.DataFrame.from_dict(rows, orient="index")


def replies_table(
    records: Sequence[Any], replies: dict[str, Sequence[Reply]], reference_name: str = "reference output",
) -> "pd.DataFrame":
    """Return a table: each record's instruction, input and reference output (a column named whose answer it
    is, ``reference_name``), then each model's reply, marked where the token cap cut it (chapter 4)."""
    import pandas as pd

    rows = []
    for index, record in enumerate(records):
        row = {"instruction": record.instruction, "input": record.input, reference_name: record.output}
        for name, model_replies in replies.items():
            reply = model_replies[index]
            row[name] = reply.text if reply.stopped else f"{reply.text} [cut at the token cap]"
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- files for other trainers


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


def export_trl_jsonl(records: Iterable[Any], path: str | os.PathLike) -> Path:
    """Return the path written: TRL prompt-completion rows, one JSON object a line (``load_dataset("json")``)."""
    rows = to_trl_prompt_completion(records)
    return write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def import_trl_jsonl(path: str | os.PathLike) -> list[AlpacaRecord]:
    """Return the Alpaca records of a TRL prompt-completion JSONL file; DataError names file, line and field."""
    rows = []
    for where, row in jsonl_objects(Path(path)):
        for field in ("prompt", "completion"):
            if not isinstance(row.get(field), str):
                raise DataError(f"{where}, field {field!r}: missing or not a string")
        if _parse_prompt(row["prompt"]) is None:
            raise DataError(f"{where}, field 'prompt': not an Alpaca prompt (neither template matches)")
        rows += from_trl_prompt_completion([row])
    return rows


def llama_factory_dataset_info(name: str, file_name: str) -> dict[str, dict[str, Any]]:
    """Return {name: entry} to merge into LLaMA-Factory's data/dataset_info.json for an Alpaca-format file."""
    return {name: {
        "file_name": file_name,
        "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"},
    }}


def axolotl_dataset_block(path: str | os.PathLike) -> dict[str, str]:
    """Return one item of an axolotl config's ``datasets:`` list for a local Alpaca-format JSON file."""
    # ds_type json: a local file is read with the datasets "json" builder (axolotl would infer it from the suffix).
    return {"path": str(path), "ds_type": "json", "type": "alpaca"}
