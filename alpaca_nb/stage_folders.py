"""A recipe stage's folder: its manifest (``stage.json``), its stop record, its start marker and its time segments.

A stage's folder is finished when its ``stage.json`` exists: written last, it records the provenance (input
files and their hashes, model, decoding settings, profile, package version, wall time, tokens, dollars). A
folder without it was interrupted. A stage whose work stopped early gets ``stage-stopped.json`` instead, with the
reason and how much was done. A stage folder is created with ``stage-started.json`` already in it, and a rerun
deletes a folder only when it carries that marker (or ``stage.json``): a folder of the user's is refused by name,
never removed. Wall time is summed over every run of a stage (``stage-segments.jsonl``; a run that was killed
counts up to its last file write). Which stage runs when is ``reproduce``'s business, not this module's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alpaca_nb import __version__
from alpaca_nb.data import DataError
from alpaca_nb.jsonl import append_records, read_records, write_text_atomically

__all__ = [
    "MANIFEST", "Provenance", "StageError", "StageStop", "StageStopped", "file_sha256", "read_manifest", "read_stop",
    "remove_stage_folder", "stage_status",
]

MANIFEST = "stage.json"
STARTED = "stage-started.json"  # the fingerprint a stage began with: an interrupted one resumes only if it matches
STOPPED = "stage-stopped.json"  # a stage whose work stopped early: why, and how much was done (StageStop)
SEGMENTS = "stage-segments.jsonl"  # one line when each run of the stage begins, one when it ends: the wall time
MANIFEST_SCHEMA = 1


class StageError(DataError):
    """A stage folder that is incomplete, from another version, not ours, or whose earlier stage has not run."""


@dataclass(frozen=True)
class Provenance:
    """What a finished stage was made from and what it cost: its folder's ``stage.json``."""

    stage: str
    fingerprint: str  # sha256 of inputs and settings: a change reruns the stage
    inputs: dict[str, str]  # input file -> sha256
    settings: dict[str, Any]
    profile: str
    package_version: str
    schema: int
    finished_at: str
    wall_seconds: float
    tokens: int | None = None
    usd: float = 0.0
    usd_paper_rates: float | None = None
    note: str = ""
    measures: dict[str, float] = field(default_factory=dict)  # figures only the stage could take (e.g. tokens/s)


@dataclass(frozen=True)
class StageStop:
    """A stage whose work stopped early (the budget, a refused key, a dead server, failures in a row): its
    folder's ``stage-stopped.json``. Not complete: the next run resumes it, and the report says how far it got."""

    stage: str
    fingerprint: str
    reason: str  # as the stage's loop gave it ("stopped: ...")
    done: int | None  # how much of the stage's work was done, of how much, counted in ``unit``
    of: int | None
    unit: str
    stopped_at: str
    wall_seconds: float
    tokens: int | None = None
    usd: float = 0.0
    note: str = ""

    def summary(self) -> str:
        """Return the reason and the count done, as the report and the error print them."""
        return self.reason + (f", {self.done:,} of {self.of:,} {self.unit}" if self.done is not None else "")


class StageStopped(StageError):
    """Raised (after the report card is written) when a stage's work stopped early: rerun to resume it."""

    def __init__(self, stop: StageStop, folder: Path):
        self.stop = stop
        super().__init__(f"{folder}: the {stop.stage} stage {stop.summary()}. What it did is kept, and it is not "
                         "recorded as complete: run again to resume it")


def file_sha256(path: str | os.PathLike) -> str:
    """Return the sha256 of a file, or of a folder's files (names and contents, in sorted order)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for item in files:
        digest.update(str(item.relative_to(path) if path.is_dir() else item.name).encode())
        with open(item, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(inputs: dict[str, str], settings: dict[str, Any]) -> str:
    payload = json.dumps({"inputs": inputs, "settings": settings, "schema": MANIFEST_SCHEMA, "version": __version__},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def read_manifest(folder: str | os.PathLike) -> Provenance:
    """Return a finished stage's provenance; StageError when the folder is incomplete or from another version."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise StageError(f"{folder}: incomplete: no {MANIFEST} (the stage was interrupted, or has not run)")
    try:
        provenance = Provenance(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as error:
        raise StageError(f"{path}: not a stage manifest of this version ({error})") from None
    if provenance.schema != MANIFEST_SCHEMA or provenance.package_version != __version__:
        raise StageError(f"{path}: written by alpaca_nb {provenance.package_version} (manifest schema "
                         f"{provenance.schema}); this is {__version__} (schema {MANIFEST_SCHEMA}): run the stage again")
    return provenance


def read_stop(folder: str | os.PathLike) -> StageStop | None:
    """Return why the stage in ``folder`` stopped early and how far it got, or None if it did not stop."""
    path = Path(folder) / STOPPED
    if not path.is_file():
        return None
    try:
        return StageStop(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as error:
        raise StageError(f"{path}: not a stage-stopped record of this version ({error}); delete it to resume") from None


def stage_status(folder: str | os.PathLike, fingerprint: str) -> str:
    """Return "complete" (finished with this fingerprint), "changed" (finished with other inputs or by another
    version), "stopped" (its work stopped early with this fingerprint: resumable), "interrupted" (started with
    this fingerprint, not finished: resumable) or "new"."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        try:
            return "complete" if read_manifest(folder).fingerprint == fingerprint else "changed"
        except StageError:
            return "changed"
    stop = read_stop(folder)
    if stop is not None and stop.fingerprint == fingerprint:
        return "stopped"
    started = folder / STARTED
    if started.is_file() and json.loads(started.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
        return "interrupted"
    return "new"


def _is_ours(folder: Path) -> bool:
    """Return True when ``folder`` is a stage folder this package made (its marker, written before any work, or
    its manifest is there) or holds nothing."""
    return (folder / STARTED).is_file() or (folder / MANIFEST).is_file() or not any(folder.iterdir())


def remove_stage_folder(folder: str | os.PathLike) -> None:
    """Delete a stage folder this package made, for a fresh run; StageError naming it, with nothing deleted, when
    it is not one (a folder of the user's that happens to sit where a stage goes)."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir() or not _is_ours(folder):
        raise StageError(f"{folder}: in the way of the {folder.name} stage, and not a stage folder (no {STARTED} or "
                         f"{MANIFEST} in it): nothing was deleted; move it away or choose another --out")
    shutil.rmtree(folder)


def _claim_fresh_folder(folder: Path, fingerprint: str) -> None:
    """Replace ``folder`` (if ours) by an empty stage folder that carries its marker from the first moment: it is
    made under a temporary name, marked, then renamed into place."""
    remove_stage_folder(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-starting-", dir=folder.parent))
    staging.chmod(0o755)
    write_text_atomically(staging / STARTED, json.dumps({"fingerprint": fingerprint}) + "\n")
    staging.rename(folder)


def _segments(folder: Path) -> list[dict[str, float]]:
    records = []
    for number, record in read_records(folder / SEGMENTS):
        if not isinstance(record.get("started"), (int, float)) or not isinstance(record.get("ended", 0), (int, float)):
            raise StageError(f"{folder / SEGMENTS}, line {number}: not a segment record (started, ended)")
        records.append(record)
    return records


def _begin_segment(folder: Path) -> float:
    """Record that a run of the stage begins (and return when). A run that a kill ended never recorded its end:
    it is closed first, at the last write it made in the folder."""
    records = _segments(folder)
    ended = {record["started"] for record in records if "ended" in record}
    killed = [record["started"] for record in records if record["started"] not in ended]
    last_write = max((item.stat().st_mtime for item in folder.rglob("*") if item.is_file()), default=0.0)
    append_records(folder / SEGMENTS, [{"started": started, "ended": max(started, last_write), "killed": True}
                                       for started in killed])
    now = time.time()
    append_records(folder / SEGMENTS, [{"started": now}])
    return now


def _end_segment(folder: Path, started: float) -> float:
    """Record that the run begun at ``started`` ends; return the stage's wall seconds over all its runs."""
    append_records(folder / SEGMENTS, [{"started": started, "ended": time.time()}])
    return round(sum(record["ended"] - record["started"] for record in _segments(folder) if "ended" in record), 1)
