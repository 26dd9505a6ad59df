"""Prices, token counts and the spending ledger: what a run costs, call by call.

Taught in chapter 2 (book/02_self_instruct.md, the live ledger) and chapter 3 (costs). The price
table is a dated, sourced data file (prices.toml), never literals in code. The ledger is the one
JSONL format in the project: the generation engine writes it, the cost chapter reads it.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import tomllib
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from alpaca_nb.llm import CallRecord

__all__ = ["BudgetExceeded", "Ledger", "LedgerEntry", "Price", "PriceError", "count_tokens", "known_models", "price"]


class PriceError(KeyError):
    """No price is known for a model; the message lists the models that have one."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class BudgetExceeded(RuntimeError):
    """A request was refused because its worst-case cost could push spending over the budget."""


@dataclass(frozen=True)
class Price:
    model: str
    input_per_1m: float
    output_per_1m: float
    batch_discount: float
    as_of: str
    source: str
    encoding: str

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        """Return the dollars for these token counts (with the batch discount when ``batch``)."""
        dollars = (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6
        return dollars * (1.0 - self.batch_discount) if batch else dollars


@lru_cache(maxsize=1)
def _price_table() -> dict[str, Price]:
    table = tomllib.loads(files("alpaca_nb").joinpath("prices.toml").read_text(encoding="utf-8"))
    return {name: Price(model=name, **row) for name, row in table["models"].items()}


def known_models() -> list[str]:
    """Return the model names that have a price."""
    return sorted(_price_table())


def _canonical(model: str) -> str:
    # Dated snapshots ("gpt-4o-mini-2024-07-18") and provider prefixes ("openai/gpt-4.1") price as their family.
    name = model.strip().lower().rsplit("/", 1)[-1]
    return re.sub(r"-\d{4}-\d{2}-\d{2}$", "", name)


def price(model: str) -> Price:
    """Return the dated, sourced price of ``model``; PriceError (listing known models) if none is known."""
    table = _price_table()
    name = _canonical(model)
    if name not in table:
        raise PriceError(f"no price known for model {model!r}; known models: {', '.join(known_models())}. "
                         "Add it to alpaca_nb/prices.toml with its date and source.")
    return table[name]


@lru_cache(maxsize=8)
def _tiktoken_encoding(name: str):
    import tiktoken

    return tiktoken.get_encoding(name)


@lru_cache(maxsize=4)
def _hf_tokenizer(model: str):
    from transformers import AutoTokenizer

    if _canonical(model) == "smollm2-135m-instruct":
        from alpaca_nb.models import embedded_model_dir

        return AutoTokenizer.from_pretrained(embedded_model_dir())
    return AutoTokenizer.from_pretrained(model)


def count_tokens(text: str, model: str) -> int:
    """Return the number of tokens ``text`` takes for ``model``.

    OpenAI models use their tiktoken encoding (p50k_base for text-davinci-003, o200k_base for the
    gpt-4o and gpt-4.1 families); other models use their own Hugging Face tokenizer.
    """
    encoding = ""
    try:
        encoding = price(model).encoding
    except PriceError:
        pass
    if encoding:
        return len(_tiktoken_encoding(encoding).encode(text, disallowed_special=()))
    try:
        import tiktoken

        return len(tiktoken.encoding_for_model(model).encode(text, disallowed_special=()))
    except KeyError:
        return len(_hf_tokenizer(model)(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------- ledger


@dataclass(frozen=True)
class LedgerEntry:
    """One API call attempt as one JSON line of ledger.jsonl."""

    time: float
    stage: str
    model: str
    api: str
    outcome: str  # "ok" | "retry" | "error"
    status: int | None
    error: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_s: float
    request_id: str
    attempt: int


class Ledger:
    """Append-only JSONL record of every call, with sums and a budget guard.

    Each entry is written as one whole line and flushed, so a killed process leaves a parseable
    file; a torn last line from such a kill is ignored (and repaired) when the ledger is reopened.
    """

    def __init__(self, path: str | os.PathLike, budget_usd: float | None = None, batch: bool = False,
                 price_as: str | None = None):
        """Open (or create) the ledger at ``path``; ``price_as`` prices every call as that model
        (for a self-hosted server whose model has no entry in the price table)."""
        self.path = Path(path)
        self.budget_usd = budget_usd
        self.batch = batch
        self.price_as = price_as
        self.entries: list[LedgerEntry] = _read_entries(self.path)
        self._reserved_usd = 0.0
        self._lock = threading.Lock()

    # ---- writing
    def append(self, entry: LedgerEntry) -> LedgerEntry:
        """Write ``entry`` as one flushed line and keep it in memory."""
        line = json.dumps(asdict(entry), ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
            self.entries.append(entry)
        return entry

    def record(self, call: CallRecord, stage: str) -> LedgerEntry:
        """Price an endpoint's call record and append it; returns the entry."""
        cost = self.price_of(call.model).cost(call.prompt_tokens, call.completion_tokens, batch=self.batch)
        return self.append(LedgerEntry(
            time=time.time(), stage=stage, model=call.model, api=call.api, outcome=call.outcome, status=call.status,
            error=call.error, prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens,
            cost_usd=cost, latency_s=call.latency_s, request_id=call.request_id, attempt=call.attempt,
        ))

    def price_of(self, model: str) -> Price:
        """Return the price used for ``model``'s calls (``price_as`` when set); PriceError if unknown."""
        return price(self.price_as or model)

    # ---- budget
    def worst_case_usd(self, model: str, prompt_tokens: int, max_completion_tokens: int) -> float:
        """Return the most a request could cost: its prompt plus ``max_completion_tokens`` of output."""
        return self.price_of(model).cost(prompt_tokens, max_completion_tokens, batch=self.batch)

    def would_exceed(self, model: str, prompt_tokens: int, max_completion_tokens: int) -> bool:
        """Return True if a request's worst case, on top of spending and in-flight reservations, passes the budget."""
        if self.budget_usd is None:
            return False
        worst = self.worst_case_usd(model, prompt_tokens, max_completion_tokens)
        return self.total_usd + self._reserved_usd + worst > self.budget_usd

    def reserve(self, model: str, prompt_tokens: int, max_completion_tokens: int) -> float:
        """Reserve a request's worst case before it starts; raises BudgetExceeded if it might not fit."""
        with self._lock:
            if self.would_exceed(model, prompt_tokens, max_completion_tokens):
                raise BudgetExceeded(
                    f"budget ${self.budget_usd:.4f}: spent ${self.total_usd:.4f}, in flight ${self._reserved_usd:.4f}; "
                    f"the next request could cost up to ${self.worst_case_usd(model, prompt_tokens, max_completion_tokens):.4f}")
            reservation = self.worst_case_usd(model, prompt_tokens, max_completion_tokens)
            self._reserved_usd += reservation
            return reservation

    def release(self, reservation: float) -> None:
        """Give back a reservation once its request has been recorded."""
        with self._lock:
            self._reserved_usd = max(0.0, self._reserved_usd - reservation)

    # ---- sums
    @property
    def total_usd(self) -> float:
        return sum(entry.cost_usd for entry in self.entries)

    def frame(self) -> pd.DataFrame:
        """Return every entry as a row."""
        return pd.DataFrame([asdict(entry) for entry in self.entries], columns=list(LedgerEntry.__dataclass_fields__))

    def summary(self, by: str = "model") -> pd.DataFrame:
        """Return calls, retries, errors, tokens, dollars and mean latency grouped ``by`` model or stage."""
        frame = self.frame()
        grouped = frame.groupby(by)
        return pd.DataFrame({
            "calls": grouped.size(),
            "ok": grouped["outcome"].apply(lambda s: int((s == "ok").sum())),
            "retries": grouped["outcome"].apply(lambda s: int((s == "retry").sum())),
            "errors": grouped["outcome"].apply(lambda s: int((s == "error").sum())),
            "prompt_tokens": grouped["prompt_tokens"].sum(),
            "completion_tokens": grouped["completion_tokens"].sum(),
            "cost_usd": grouped["cost_usd"].sum(),
            "mean_latency_s": grouped["latency_s"].mean(),
        })


def _read_entries(path: Path) -> list[LedgerEntry]:
    """Return the entries of an existing ledger, dropping (and truncating away) a torn last line."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    complete, _, torn = raw.rpartition(b"\n")
    if torn:  # a kill mid-write: the partial line carries no full record
        with path.open("r+b") as handle:
            handle.truncate(len(complete) + 1 if complete else 0)
    entries = []
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                entries.append(LedgerEntry(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as error:
                raise ValueError(f"{path}, line {number}: not a ledger entry ({error})") from None
    return entries
