"""Supervised fine-tuning data as Alpaca trained on it: the prompt templates and their formatting.

Taught in chapter 3 (token counts) and chapter 4 (fine-tuning). The templates are byte-for-byte
stanford_alpaca train.py's PROMPT_DICT.
"""

from __future__ import annotations

__all__ = ["PROMPT_INPUT", "PROMPT_NO_INPUT", "format_prompt", "format_example"]

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
