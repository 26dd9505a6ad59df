"""Self-instruct's text, as Alpaca wrote it: the prompt (``encode_prompt``, and its parts for pricing any choice
of seeds), the completion's task blocks (``parse_completion``) and upstream's filters (``filter_reason``).

Faithful to stanford_alpaca's generate_instruction.py: prompt layout, block parsing and the filter rules.
Taught in chapter 2; the generation loop that uses them is ``selfinstruct``.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from alpaca_nb.api_costs import count_tokens
from alpaca_nb.data import load_prompt_template

__all__ = [
    "BLACKLIST", "Candidate", "FILTER_REASONS", "NUMBER_MARK", "ParsedBlocks", "PromptParts", "assemble_prompt",
    "encode_chat_prompt", "encode_completion", "encode_prompt", "filter_reason", "parse_completion", "prompt_parts",
]


# stanford_alpaca generate_instruction.py: words a text-only model cannot act on.
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
FILTER_REASONS = ("too_short", "too_long", "blacklisted_word", "write_a_program", "starts_with_punctuation",
                  "starts_non_ascii")
_BLACKLIST_PATTERNS = [re.compile(rf"\b({re.escape(word)})\b", flags=re.IGNORECASE) for word in BLACKLIST]
CHAT_SYSTEM_PROMPT = ("You continue numbered task lists. Reply with the remaining tasks only, in exactly the format "
                      "shown: 'N. Instruction:', 'N. Input:', 'N. Output:', tasks separated by a line '###'.")


class Candidate(NamedTuple):
    instruction: str
    input: str
    output: str


class ParsedBlocks(list):
    """The parsed (instruction, input, output) candidates, with counts of the blocks that were dropped."""

    def __init__(self, candidates: Sequence[Candidate] = (), malformed: int = 0, truncated: int = 0):
        super().__init__(candidates)
        self.malformed = malformed  # blocks that did not split into instruction, input and output
        self.truncated = truncated  # the last block, dropped because the completion hit max_tokens


def _normalise_instruction(instruction: str) -> str:
    return re.sub(r"\s+", " ", instruction).strip().rstrip(":")


def encode_prompt(seed_examples: Sequence[Any], template: str | None = None) -> str:
    """Return the completion prompt: prompt.txt, numbered seed blocks separated by ###, then 'N. Instruction:'."""
    prompt = (load_prompt_template() if template is None else template) + "\n"
    prompt += "".join(f"{BLOCK_SEPARATOR}\n" + _encode_block(number, example)
                      for number, example in enumerate(seed_examples, start=1))
    prompt += f"{BLOCK_SEPARATOR}\n"
    prompt += _header(len(seed_examples) + 1, FIELDS[0])
    return prompt


# The block layout, shared by encode_prompt, parse_completion and the format constraints below.
FIELDS = ("Instruction", "Input", "Output")
BLOCK_SEPARATOR = "###"
NO_INPUT = "<noinput>"


def _header(number: int, field: str) -> str:
    return f"{number}. {field}:"


def _encode_block(number: int, example: Any) -> str:
    task_input = example.input if example.input.strip() else NO_INPUT
    instruction, input_field, output = (_header(number, field) for field in FIELDS)
    return (f"{instruction} {_normalise_instruction(example.instruction)}\n"
            f"{input_field}\n{task_input}\n"
            f"{output}\n{example.output}\n")


def encode_completion(examples: Sequence[Any], first_number: int = 4) -> str:
    """Return the completion a teacher would write for ``examples``: the text after 'N. Instruction:'."""
    text = f"{BLOCK_SEPARATOR}\n".join(_encode_block(number, example)
                                       for number, example in enumerate(examples, start=first_number))
    return text.removeprefix(_header(first_number, FIELDS[0]))


def encode_chat_prompt(seed_examples: Sequence[Any], template: str | None = None) -> list[dict[str, str]]:
    """Return chat messages carrying the same prompt, for endpoints that only serve chat models."""
    return [{"role": "system", "content": CHAT_SYSTEM_PROMPT},
            {"role": "user", "content": encode_prompt(seed_examples, template)}]


def parse_completion(text: str, num_prompt_instructions: int = 3, truncated: bool = False) -> ParsedBlocks:
    """Return the candidates in a completion, split as upstream does; never raises.

    The completion continues after 'N. Instruction:', so that header is put back before splitting
    on ###. A chat model that repeats the header is tolerated.
    """
    first = num_prompt_instructions + 1
    body = str(text)
    body = re.sub(rf"^\s*{first}\.\s+{FIELDS[0]}:", "", body, count=1)
    blocks = re.split(re.escape(BLOCK_SEPARATOR), _header(first, FIELDS[0]) + body)
    dropped_truncated = 0
    if truncated and blocks:
        blocks, dropped_truncated = blocks[:-1], 1
    candidates, malformed = [], 0
    for offset, block in enumerate(blocks):
        parts = re.split(rf"{first + offset}\.\s+({'|'.join(FIELDS)}):", block)
        if len(parts) != 7:
            malformed += bool(block.strip())  # an empty tail after the last ### is no block at all
            continue
        task_input = parts[4].strip()
        candidates.append(Candidate(parts[2].strip(), "" if task_input.lower() == NO_INPUT else task_input,
                                    parts[6].strip()))
    return ParsedBlocks(candidates, malformed, dropped_truncated)


def filter_reason(instruction: str) -> str | None:
    """Return None to keep the instruction, else the upstream rule that rejects it (see FILTER_REASONS)."""
    words = instruction.split()
    if len(words) <= 3:
        return "too_short"
    if len(words) > 150:
        return "too_long"
    if any(pattern.search(instruction) for pattern in _BLACKLIST_PATTERNS):
        return "blacklisted_word"
    if instruction.startswith("Write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_non_ascii"
    return None


# Where a seed block's number goes in PromptParts' texts: a character no seed task holds.
NUMBER_MARK = "\x00"


@dataclass(frozen=True)
class PromptParts:
    """encode_prompt cut where its token count adds up: before each "###". Any choice of these seeds' prompt is
    ``head`` + each chosen block numbered 1, 2, ... + ``tail`` numbered one past the last, and its tokens the sum
    of the parts' tokens, each number's tokens swapped for "1"'s. The static book's prompt widget does that
    arithmetic in the page (``assemble_prompt`` is its Python twin; tests check both against count_tokens)."""

    head: str
    head_tokens: int
    blocks: list[str]          # "###\n" + each seed's block, NUMBER_MARK where its number goes
    block_tokens: list[int]    # each block's tokens when numbered 1
    tail: str                  # "###\n" + the next task's header, NUMBER_MARK for its number
    tail_tokens: int           # numbered 1
    number_tokens: list[int]   # tokens of str(n) at index n, for 0 to len(blocks) + 1
    marks: list[int]           # how often NUMBER_MARK occurs in each block (3: instruction, input, output)


def prompt_parts(seed_examples: Sequence[Any], model: str = "text-davinci-003", template: str | None = None) -> PromptParts:
    """Return encode_prompt's parts for every one of ``seed_examples``, with their token counts for ``model``."""
    head = (load_prompt_template() if template is None else template) + "\n"
    blocks = [f"{BLOCK_SEPARATOR}\n" + _encode_block(NUMBER_MARK, example) for example in seed_examples]  # type: ignore[arg-type]
    if any(NUMBER_MARK in str(value) for example in seed_examples for value in vars(example).values()):
        raise ValueError("a seed task holds the NUL character, which PromptParts uses to mark a block's number")
    tail = f"{BLOCK_SEPARATOR}\n" + _header(NUMBER_MARK, FIELDS[0])  # type: ignore[arg-type]
    return PromptParts(head, count_tokens(head, model), blocks,
                       [count_tokens(_numbered(block, 1), model) for block in blocks], tail,
                       count_tokens(_numbered(tail, 1), model),
                       [count_tokens(str(number), model) for number in range(len(blocks) + 2)],
                       [block.count(NUMBER_MARK) for block in blocks])


def _numbered(text: str, number: int) -> str:
    return text.replace(NUMBER_MARK, str(number))


def assemble_prompt(parts: PromptParts, chosen: Sequence[int]) -> tuple[str, int]:
    """Return the prompt for the seeds at ``chosen`` and its tokens, by the parts' arithmetic alone."""
    def renumbered(tokens: int, marks: int, number: int) -> int:
        return tokens + marks * (parts.number_tokens[number] - parts.number_tokens[1])

    prompt = parts.head + "".join(_numbered(parts.blocks[index], number) for number, index in enumerate(chosen, start=1))
    tokens = parts.head_tokens + sum(renumbered(parts.block_tokens[index], parts.marks[index], number)
                                     for number, index in enumerate(chosen, start=1))
    return prompt + _numbered(parts.tail, len(chosen) + 1), tokens + renumbered(parts.tail_tokens, 1, len(chosen) + 1)
