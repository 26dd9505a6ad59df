"""Files that survive SIGKILL: append-only JSONL (whole-line flushed writes, torn tails repaired on read)
and whole files replaced atomically.

Shared by the generation run (generated.jsonl, requests.jsonl), the ledger (ledger.jsonl), the SFT
exporters and the training run's loss_curve.json.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

from alpaca_nb.data import DataError

__all__ = ["append_records", "read_records", "write_text_atomically"]


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Return (line number, record) for each line; a torn last line (a kill mid-write) is cut off the file.

    A complete line that is not JSON is damage no kill can cause: DataError names the file and line,
    and the file is left as it is.
    """
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
                raise DataError(f"{path}, line {number}: invalid JSON ({error.msg}); the file is unchanged: "
                                "repair or delete that line, then run again") from None
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


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Return ``path`` after writing ``text`` there through a temporary file: a reader never sees half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "x" rather than mkstemp: mkstemp's files are private (0600), and a run's
    # results must stay as readable as any other file the user writes (umask), e.g. to a course's group.
    staging = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    with open(staging, "x", encoding="utf-8") as out:
        out.write(text)
    os.replace(staging, target)
    return target
