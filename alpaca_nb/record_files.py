"""Reading record files strictly: JSON Lines and JSON arrays of objects, whose every error (empty file, bad UTF-8,
invalid JSON, a missing, mistyped or blank field, a duplicate id) is a :class:`DataError` naming the file, the
line or record, and the field. The loaders of ``data`` and of the stages read through these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = [
    "DataError", "jsonl_objects", "required_field",
]


class DataError(ValueError):
    """A data file is missing, unverifiable or malformed; the message names file, line and field."""


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: file is empty")
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is tolerated
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start})") from None


def jsonl_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, object) for each non-blank line; location reads 'file, line N'.

    Lines end at "\n" only: JSON text may hold U+2028 and other characters str.splitlines breaks on.
    """
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
        yield where, value


def _json_list_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, object) for each record of a JSON array; location names the record index."""
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(value).__name__}")
    if not value:
        raise DataError(f"{path}: the array holds no records")
    for index, record in enumerate(value):
        where = f"{path}, record {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def required_field(where: str, record: dict[str, Any], name: str, kind: type, *, allow_empty: bool = False) -> Any:
    """Return ``record[name]``, refusing a missing, mistyped or (unless ``allow_empty``) blank value with a
    DataError that names ``where`` (file and line) and the field."""
    if name not in record:
        raise DataError(f"{where}, field {name!r}: missing")
    value = record[name]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise DataError(f"{where}, field {name!r}: expected {kind.__name__}, got {type(value).__name__}")
    if not allow_empty and kind is str and not value.strip():
        raise DataError(f"{where}, field {name!r}: empty")
    return value


def _single_instance(where: str, record: dict[str, Any]) -> tuple[str, str]:
    instances = required_field(where, record, "instances", list)
    if not instances:
        raise DataError(f"{where}, field 'instances': empty")
    first = instances[0]
    if not isinstance(first, dict):
        raise DataError(f"{where}, field 'instances[0]': expected object, got {type(first).__name__}")
    inner = f"{where}, instances[0]"
    return required_field(inner, first, "input", str, allow_empty=True), required_field(inner, first, "output", str)


def _unique_ids(records: list, path: Path, locations: list[str]) -> None:
    seen: dict[str, str] = {}
    for record, where in zip(records, locations):
        if record.id in seen:
            raise DataError(f"{where}, field 'id': duplicate id {record.id!r} (first seen at {seen[record.id].split(', ', 1)[1]})")
        seen[record.id] = where


def _load_with_ids(path: Path, build: Callable[[str, dict[str, Any]], Any]) -> list:
    records, locations = [], []
    for where, raw in jsonl_objects(path):
        records.append(build(where, raw))
        locations.append(where)
    if not records:
        raise DataError(f"{path}: no records")
    _unique_ids(records, path, locations)
    return records
