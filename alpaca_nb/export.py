"""Files for other trainers: the SFT data as TRL, LLaMA-Factory and axolotl read it (``alpaca-nb export``).

Taught in chapter 4 (book/04_fine_tuning.md). alpaca_nb trains on Stanford's JSON (``sft.export_stanford_json``);
an instructor who prefers TRL's ``SFTTrainer``, LLaMA-Factory or axolotl gets the same records in their format,
and reads TRL's rows back exactly (``import_trl_jsonl``), so a round trip loses nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from alpaca_nb.data import AlpacaRecord, DataError, jsonl_objects
from alpaca_nb.jsonl import json_line, write_text_atomically
from alpaca_nb.sft import PROMPT_INPUT, PROMPT_NO_INPUT, export_stanford_json, format_prompt

__all__ = [
    "EXPORT_FORMATS", "axolotl_dataset_block", "export_for", "export_trl_jsonl", "from_trl_prompt_completion",
    "import_trl_jsonl", "llama_factory_dataset_info", "to_trl_prompt_completion",
]


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


def export_trl_jsonl(records: Iterable[Any], path: str | os.PathLike) -> Path:
    """Return the path written: TRL prompt-completion rows, one JSON object a line (``load_dataset("json")``)."""
    rows = to_trl_prompt_completion(records)
    return write_text_atomically(path, "".join(json_line(row) + "\n" for row in rows))


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


EXPORT_FORMATS = ("stanford", "trl", "llama-factory", "axolotl")


def export_for(records: Iterable[Any], trainer: str, folder: str | os.PathLike) -> list[Path]:
    """Return the files written into ``folder`` for ``trainer`` (one of ``EXPORT_FORMATS``): the data, and for
    LLaMA-Factory and axolotl the snippet their configuration needs to find it."""
    if trainer not in EXPORT_FORMATS:
        raise ValueError(f"unknown trainer format {trainer!r}; known: {', '.join(EXPORT_FORMATS)}")
    folder = Path(folder)
    if trainer == "trl":
        return [export_trl_jsonl(records, folder / "alpaca_trl.jsonl")]
    data = export_stanford_json(records, folder / "alpaca_data.json")
    if trainer == "llama-factory":
        info = llama_factory_dataset_info("alpaca_nb", data.name)
        return [data, write_text_atomically(folder / "dataset_info.json", json.dumps(info, indent=2) + "\n")]
    if trainer == "axolotl":
        block = axolotl_dataset_block(data.resolve())
        # YAML: JSON-quoted scalars keep any path legal.
        lines = ["datasets:"] + [f"  {'-' if index == 0 else ' '} {key}: {json.dumps(value)}"
                                 for index, (key, value) in enumerate(block.items())]
        return [data, write_text_atomically(folder / "axolotl_datasets.yml", "\n".join(lines) + "\n")]
    return [data]
