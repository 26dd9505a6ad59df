"""Where greedy replies stop: batched greedy decoding with the end tokens a chat template uses, the answers that run
to the token cap or invent a new section, and the tables chapter 5 shows of them (rates with 95 % intervals).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from alpaca_nb.stats import wilson_interval

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    import pandas as pd

__all__ = [
    "Reply", "answer_cap", "answer_tokens", "answers_over", "greedy_completions", "greedy_replies", "invents_a_section",
    "replies_table", "stop_table",
]


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
    from alpaca_nb.sft import format_prompt

    prompts = [format_prompt(record.instruction, record.input) for record in records]
    return greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size)


def greedy_completions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 128,
    batch_size: int = 8, add_special_tokens: bool = True, show_progress: bool = True,
) -> list[Reply]:
    """Return the model's greedy continuation of each prompt, exactly as written (a template already applied).

    Batched with left padding, so every prompt ends where generation starts. A reply counts as stopped when
    an end id appears among its new tokens; a row that ended early is padded with the pad id afterwards,
    which is EOS for the embedded model, so the first end id is where the model stopped. A tokenizer without a
    pad token (LLaMA-7B's, the cluster's base model) pads with EOS here, for this call only: the attention mask
    hides the padding.
    """
    import torch

    from alpaca_nb.progress import progress_bar

    end_ids = _end_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[Reply] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    borrowed_pad = tokenizer.pad_token is None
    if borrowed_pad:
        tokenizer.pad_token = tokenizer.eos_token
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
        if borrowed_pad:
            tokenizer.pad_token = None
    return replies


def invents_a_section(text: str) -> bool:
    """Return True when a reply writes a new "### ..." header (an Instruction, Response or Explanation of its own)."""
    return re.search(r"^\s*###", text, flags=re.MULTILINE) is not None


def answer_tokens(records: Sequence[Any], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Return the length in tokens of each record's reference answer (its ``output``)."""
    return [len(tokenizer(record.output, add_special_tokens=False)["input_ids"]) for record in records]


def _ends_within(tokens: int, cap: int) -> bool:
    """Return True when a text of ``tokens`` tokens, then its end-of-sequence token, fits in ``cap`` new tokens."""
    return tokens < cap


def answer_cap(records: Sequence[Any], tokenizer: PreTrainedTokenizerBase) -> int:
    """Return the token cap that measures whether replies end: the longest reference answer among ``records``,
    plus its end-of-sequence token. A reply still running there is longer than every answer in the data; a
    smaller cap would count a reply as run on for being as long as the data's own answer (chapter 4)."""
    return 1 + max(answer_tokens(records, tokenizer), default=0)


def answers_over(records: Sequence[Any], tokenizer: PreTrainedTokenizerBase, cap: int) -> int:
    """Return how many reference answers among ``records`` would not end (EOS included) within ``cap`` tokens."""
    return sum(not _ends_within(tokens, cap) for tokens in answer_tokens(records, tokenizer))


def stop_table(replies: dict[str, Sequence[Reply]], max_new_tokens: int, within: int | None = None) -> "pd.DataFrame":
    """Return one row per model: how many replies ended with EOS before the cap (and, given ``within``, how many
    of them within that many tokens), why the others ran on (a loop or not), how many invented a ``###``
    section, the share that ended with its 95 % interval, and how long the replies ran."""
    import pandas as pd

    from alpaca_nb.sft import repeats_itself

    rows = {}
    for name, model_replies in replies.items():
        stopped = sum(reply.stopped for reply in model_replies)
        cut = [reply for reply in model_replies if not reply.stopped]
        lengths = sorted(reply.new_tokens for reply in model_replies)
        ended_within = {} if within is None else {f"ended within {within} tokens": sum(
            reply.stopped and _ends_within(reply.new_tokens, within) for reply in model_replies)}
        rows[name] = {"replies": len(model_replies), "ended with EOS": stopped, **ended_within,
                      f"cut at {max_new_tokens} tokens": len(cut),
                      "of which looping": sum(repeats_itself(reply.text) for reply in cut),
                      "with an invented ### section": sum(invents_a_section(reply.text) for reply in model_replies),
                      "stop rate": stopped / len(model_replies) if model_replies else None,
                      "95 % interval": _percent_interval(stopped, len(model_replies)),
                      "median tokens": lengths[len(lengths) // 2] if lengths else None}
    return pd.DataFrame.from_dict(rows, orient="index")


def _percent_interval(successes: int, n: int) -> str | None:
    """Return Wilson's 95 % interval of ``successes / n`` written for a table ("80%-98%"); None for no data."""
    if n == 0:
        return None
    low, high = wilson_interval(successes, n)
    return f"{low:.0%}-{high:.0%}"


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
