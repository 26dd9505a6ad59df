"""Format constraints for the teacher's completion (chapter 2's constrained funnel): a JSON schema or a GBNF grammar
that makes the server emit only well-formed task blocks, and the parser that reads what it emitted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from alpaca_nb.selfinstruct_prompts import BLOCK_SEPARATOR, FIELDS, Candidate, _header, encode_completion

__all__ = [
    "FORMATS", "FormatConstraint", "format_constraint",
]

FORMATS = ("upstream", "grammar", "json_schema")


@dataclass(frozen=True)
class FormatConstraint:
    """Constrains a teacher's completion to the self-instruct block layout, so that every block parses.

    ``kind="grammar"``: a GBNF grammar sent to llama.cpp servers (``extra_body={"grammar": ...}``),
    fixing the numbered headers and ``###`` separators of ``encode_prompt`` and leaving each field free
    text on one line. ``kind="json_schema"``: OpenAI-style structured outputs (chat API), a list of
    {instruction, input, output} objects, turned back into block text before parsing. Either way
    ``blocks`` tasks follow the prompt's seeds, numbered from ``first_number`` (chapter 2).
    Upstream sent no constraint; ``generate`` without one stays upstream-faithful.
    """

    kind: str = "grammar"
    first_number: int = 4
    blocks: int = 8
    max_field_chars: int = 300

    def __post_init__(self) -> None:
        if self.kind not in FORMATS[1:]:
            raise ValueError(f"kind={self.kind!r}: expected one of {FORMATS[1:]}")
        if self.blocks < 1 or self.max_field_chars < 1:
            raise ValueError("blocks and max_field_chars must be at least 1")

    def grammar(self) -> str:
        """Return the GBNF grammar of ``blocks`` blocks, the first one continuing after its prompt's header."""
        numbers = range(self.first_number, self.first_number + self.blocks)
        separator = _gbnf_literal(f"{BLOCK_SEPARATOR}\n")
        rules = [f"root ::= {f' {separator} '.join(f'block{number}' for number in numbers)}"]
        for number in numbers:
            instruction, input_field, output = (_gbnf_literal(_header(number, field)) for field in FIELDS)
            opening = '" "' if number == self.first_number else f'{instruction} " "'
            rules.append(f'block{number} ::= {opening} field "\\n" {input_field} "\\n" field "\\n" '
                         f'{output} "\\n" field "\\n"')
        rules.append(f"field ::= [^\\n#] [^\\n#]{{0,{self.max_field_chars - 1}}}")
        return "\n".join(rules) + "\n"

    def json_schema(self) -> dict[str, Any]:
        """Return the structured-output schema: an object holding exactly ``blocks`` tasks."""
        task = {"type": "object", "additionalProperties": False, "required": ["instruction", "input", "output"],
                "properties": {name: {"type": "string"} for name in ("instruction", "input", "output")}}
        return {"type": "object", "additionalProperties": False, "required": ["tasks"],
                "properties": {"tasks": {"type": "array", "items": task, "minItems": self.blocks,
                                         "maxItems": self.blocks}}}

    def request_args(self) -> dict[str, Any]:
        """Return the extra arguments of the completion request that impose the constraint."""
        if self.kind == "grammar":
            return {"extra_body": {"grammar": self.grammar()}}
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "self_instruct_tasks", "strict": True, "schema": self.json_schema()}}}

    def completion_text(self, text: str) -> str:
        """Return the completion as block text for ``parse_completion`` (JSON tasks re-encoded; else as is)."""
        if self.kind == "grammar":
            return text
        try:
            tasks = [Candidate(str(task["instruction"]), str(task["input"]), str(task["output"]))
                     for task in json.loads(text)["tasks"]]
        except (ValueError, TypeError, KeyError):
            return text  # not the schema's JSON (a truncated reply): parse_completion counts it malformed
        return encode_completion(tasks, self.first_number)


def format_constraint(name: str, num_prompt_instructions: int = 3) -> FormatConstraint | None:
    """Return the constraint a format name asks for: None for "upstream", else a FormatConstraint."""
    if name not in FORMATS:
        raise ValueError(f"unknown output format {name!r}; choose one of {', '.join(FORMATS)}")
    return None if name == "upstream" else FormatConstraint(name, first_number=num_prompt_instructions + 1)


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)  # GBNF string literals escape like JSON strings
