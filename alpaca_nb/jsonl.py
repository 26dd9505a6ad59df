"""Append-only JSONL files that survive SIGKILL: whole-line flushed writes, torn tails repaired on read.

Shared by the generation run (generated.jsonl, requests.jsonl) and the ledger (ledger.jsonl).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["append_records", "read_records"]


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Return (line number, record) for each line; a torn last line (a kill mid-write) is cut off the file."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    complete, _, torn = raw.rpartition(b"\n")
    if torn:  # the partial line carries no full record: remove it so later appends start on a fresh line
        with path.open("r+b") as handle:
            handle.truncate(len(complete) + 1 if complete else 0)
    records = []
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: invalid JSON ({error.msg})") from None
    return records


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records as whole lines in one write, flushed and synced: a kill never leaves half a record."""
    if not records:
        return
    payload = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
