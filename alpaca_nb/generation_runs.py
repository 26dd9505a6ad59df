"""A generation run's folder, as chapters 2 and 3 and the report card read it: the records it kept
(``generated.jsonl``), its finished requests and their funnel counters (``requests.jsonl``), the run's report
(``load_run``) and the funnel table. ``selfinstruct`` writes these folders.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from alpaca_nb.costs import Ledger
from alpaca_nb.data import AlpacaRecord
from alpaca_nb.jsonl import append_records, read_records
from alpaca_nb.selfinstruct_prompts import FILTER_REASONS

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "GenerationReport", "copy_first_requests", "funnel_table", "kept_records", "load_run", "read_generated",
    "read_requests",
]


def read_generated(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Return the kept records of a generation run (generated.jsonl)."""
    return [record for _, record in read_records(Path(out_dir) / "generated.jsonl")]


def kept_records(out_dir: str | os.PathLike) -> list[AlpacaRecord]:
    """Return the kept instructions of a run as Alpaca records (instruction, input, output)."""
    return [AlpacaRecord(record["instruction"], record["input"], record["output"]) for record in read_generated(out_dir)]


def read_requests(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Return one entry per finished request (requests.jsonl): its funnel counters and the raw completion."""
    return [entry for _, entry in read_records(Path(out_dir) / "requests.jsonl")]


@dataclass
class GenerationReport:
    out_dir: Path
    kept: int = 0
    requests: int = 0
    failed_requests: int = 0
    counters: Counter = field(default_factory=Counter)  # blocks, malformed, truncated, each filter reason, near_duplicate
    spent_usd: float = 0.0
    stopped_reason: str = ""
    last_error: str | None = None  # the last request that failed after its retries, for the stop message

    @property
    def keep_rate(self) -> float:
        """Return the share of generated task blocks that ended up kept (0 before any block): chapter 3 prices it."""
        return self.kept / self.counters["blocks"] if self.counters["blocks"] else 0.0

    def funnel(self) -> dict[str, int]:
        """Return generated blocks -> parsed -> passed filters -> kept, with the loss at each step."""
        counts = self.counters
        parsed = counts["blocks"] - counts["malformed"] - counts["truncated"]
        filtered = sum(counts[reason] for reason in FILTER_REASONS)
        return {"generated blocks": counts["blocks"], "parsed": parsed, "passed filters": parsed - filtered,
                "kept (not near-duplicates)": parsed - filtered - counts["near_duplicate"]}


def load_run(out_dir: str | os.PathLike) -> GenerationReport:
    """Return the report of a run as its files record it (kept records, finished requests, dollars spent)."""
    out = Path(out_dir)
    finished = read_requests(out)
    report = GenerationReport(out, kept=len(read_generated(out)), requests=len(finished))
    for entry in finished:
        report.counters.update(entry["counters"])
    report.spent_usd = Ledger(out / "ledger.jsonl").total_usd if (out / "ledger.jsonl").is_file() else 0.0
    return report


def funnel_table(runs: Mapping[str, str | os.PathLike]) -> "pd.DataFrame":
    """Return one column per run folder: requests, where the generated blocks went, and what the completions were.

    The completion rows measure what the chapter would otherwise assert: how long the teacher wrote,
    how often the token cap cut it, and how many blocks each completion held in the right format.
    """
    import pandas as pd

    columns = {}
    for name, out_dir in runs.items():
        report, requests = load_run(out_dir), read_requests(out_dir)
        counts = report.counters
        parsed = counts["blocks"] - counts["malformed"] - counts["truncated"]
        columns[name] = {
            "requests": report.requests,
            "generated blocks": counts["blocks"],
            "malformed (layout broken)": counts["malformed"],
            "truncated (cut by the token cap)": counts["truncated"],
            "failed upstream's filters": sum(counts[reason] for reason in FILTER_REASONS),
            "near-duplicates (ROUGE-L > 0.7)": counts["near_duplicate"],
            "kept": report.kept,
            "keep rate (kept / generated blocks)": report.keep_rate,
            "mean completion tokens": _mean([entry.get("completion_tokens", 0) for entry in requests]),
            "share of completions stopped by the token cap": _mean([entry["finish_reason"] == "length"
                                                                    for entry in requests]),
            "well-formed blocks per completion": parsed / report.requests if report.requests else 0.0,
        }
    # One object Series per run: a plain DataFrame would turn the counts into floats beside the rates.
    return pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()})


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def copy_first_requests(run: str | os.PathLike, out_dir: str | os.PathLike, requests: int) -> Path:
    """Write into ``out_dir`` what run ``run``'s requests numbered below ``requests`` produced: their entries, kept
    records and ledger lines, counted as that run counted them (its near-duplicate pool held whatever had been
    kept when each finished). Returns ``out_dir``."""
    source, out = Path(run), Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    finished = [entry for entry in read_requests(source) if entry["request"] < requests]
    request_ids = {entry["request_id"] for entry in finished}
    append_records(out / "requests.jsonl", finished)
    append_records(out / "generated.jsonl", [record for record in read_generated(source) if record["request"] < requests])
    if (source / "ledger.jsonl").is_file():
        append_records(out / "ledger.jsonl", [line for _, line in read_records(source / "ledger.jsonl")
                                              if line.get("request_id") in request_ids])
    return out
