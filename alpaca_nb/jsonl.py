"""Files that survive SIGKILL: append-only JSONL (whole-line flushed writes; a torn tail is skipped on read and
repaired by the next write) and whole files replaced atomically.

Shared by the generation run (generated.jsonl, requests.jsonl), the ledger (ledger.jsonl), the reply and judge
caches, the SFT exporters and the training run's loss_curve.json.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

from alpaca_nb.data import DataError

__all__ = ["append_records", "json_line", "read_records", "write_text_atomically"]

# Characters that str.splitlines (and many editors and tools) take for line ends, which json.dumps with
# ensure_ascii=False leaves raw: a model's text may hold them, so they are written escaped.
_LINE_BREAKS_JSON_KEEPS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Return (line number, record) for each line; the file is never changed.

    Lines end at "\\n" only. A last line without its "\\n" is a record when it parses (a file written by
    hand) and otherwise a torn write (a kill mid-append), which is skipped; the next append repairs it.
    A complete line that is not JSON is damage no kill can cause: DataError names the file and line.
    """
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8").split("\n")
    tail = lines.pop()
    records = [(number, _parse(path, number, line)) for number, line in enumerate(lines, start=1) if line.strip()]
    if tail.strip() and (record := _complete_tail(tail)) is not None:
        records.append((len(lines) + 1, record))
    return records


def _parse(path: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {number}: invalid JSON ({error.msg}); the file is unchanged: "
                        "repair or delete that line, then run again") from None


def _complete_tail(tail: str) -> Any | None:
    try:
        return json.loads(tail)
    except json.JSONDecodeError:
        return None


def json_line(record: Any) -> str:
    """Return ``record`` as one JSON line (no newline) that no line-splitting reader can break."""
    line = json.dumps(record, ensure_ascii=False)
    for raw, escaped in _LINE_BREAKS_JSON_KEEPS.items():
        line = line.replace(raw, escaped)  # only ever inside a JSON string, where the escape means the same
    return line


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records as whole lines in one write, flushed and synced: a kill never leaves half a record.

    Writers take an exclusive lock, so lines from concurrent processes never interleave; a torn last line
    left by a kill is cut off first, and a complete last record without its newline gets one.
    """
    if not records:
        return
    payload = "".join(json_line(record) + "\n" for record in records).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _repair_tail(handle)
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def _repair_tail(handle: Any) -> None:
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return
    handle.seek(size - 1)
    if handle.read(1) == b"\n":
        return
    handle.seek(0)  # rare (after a kill): read the whole file to find where its last line starts
    complete, _, tail = handle.read().rpartition(b"\n")
    if _complete_tail(tail.decode("utf-8", errors="replace")) is not None:
        handle.write(b"\n")
    else:  # a torn write carries no full record
        handle.truncate(len(complete) + 1 if complete else 0)


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
