"""API dollars: dated prices, token counts, the spending ledger and what generating a dataset costs.

Taught in chapter 2 (book/02_self_instruct.md, the live ledger) and chapter 3 (book/03_costs.md). The price
table is a dated, sourced data file (prices.toml), never literals in code. The ledger is the one JSONL format
in the project: the generation engine writes it, the cost chapter and the report card read it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
import tomllib
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from alpaca_nb.data import DataError, cache_dir, offline
from alpaca_nb.jsonl import append_records, read_records

if TYPE_CHECKING:
    from alpaca_nb.llm import CallRecord

__all__ = [
    "BudgetExceeded", "GenerationCost", "Ledger", "LedgerEntry", "Price", "PriceError", "TIKTOKEN_ENCODINGS",
    "count_tokens", "generation_cost", "generation_cost_table", "install_tiktoken_encodings", "known_models",
    "plot_generation_cost", "price", "price_file", "tiktoken_cache", "tiktoken_encoding",
]


def price_file() -> dict:
    """Return prices.toml: the dated, sourced API prices (``models``) and GPU rental rates (``gpus``)."""
    return tomllib.loads(files("alpaca_nb").joinpath("prices.toml").read_text(encoding="utf-8"))


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
    return {name: Price(model=name, **row) for name, row in price_file()["models"].items()}


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


TIKTOKEN_ENCODINGS = ("r50k_base", "p50k_base", "cl100k_base", "o200k_base")
# tiktoken caches each encoding under the sha1 of the URL it would download it from.
_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"


def _tiktoken_key(name: str) -> str:
    return hashlib.sha1(_TIKTOKEN_URL.format(name=name).encode()).hexdigest()


def tiktoken_cache() -> Path:
    """Return the folder tiktoken reads its encodings from: ``$TIKTOKEN_CACHE_DIR``, else ``<user cache>/tiktoken``."""
    return Path(os.environ.get("TIKTOKEN_CACHE_DIR") or cache_dir() / "tiktoken")


def install_tiktoken_encodings(source: str | os.PathLike) -> list[str]:
    """Copy ``NAME.tiktoken`` files from ``source`` into :func:`tiktoken_cache`; return the names installed.

    ``alpaca-nb prepare --tiktoken-from DIR`` runs it, so that token counting works offline in any
    shell afterwards, with no variable to export.
    """
    target = tiktoken_cache()
    target.mkdir(parents=True, exist_ok=True)
    installed = []
    for name in TIKTOKEN_ENCODINGS:
        origin = Path(source) / f"{name}.tiktoken"
        if origin.is_file():
            shutil.copyfile(origin, target / _tiktoken_key(name))  # a copy: tiktoken deletes a cache file it finds corrupt
            installed.append(name)
    return installed


@lru_cache(maxsize=8)
def tiktoken_encoding(name: str):
    """Return tiktoken's encoding ``name``, from :func:`tiktoken_cache` (downloaded there when online)."""
    import tiktoken

    # tiktoken reads the variable at each load; unset, it would look in a temporary folder and then download.
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
    if offline() and not (tiktoken_cache() / _tiktoken_key(name)).is_file():
        raise DataError(f"tiktoken encoding {name!r} is not in {tiktoken_cache()} and ALPACA_NB_OFFLINE forbids "
                        "downloading it; run `alpaca-nb prepare --tiktoken-from DIR` with a folder of NAME.tiktoken files")
    try:
        return tiktoken.get_encoding(name)
    except OSError as error:  # requests' errors are OSErrors: offline, or the download failed
        raise DataError(f"tiktoken encoding {name!r} is neither in {tiktoken_cache()} nor downloadable "
                        f"({type(error).__name__}); run `alpaca-nb prepare --tiktoken-from DIR` with a folder of "
                        "NAME.tiktoken files, or once with internet access") from None


@lru_cache(maxsize=4)
def _hf_tokenizer(model: str):
    from alpaca_nb.models import load_tokenizer

    return load_tokenizer(None if _canonical(model) == "smollm2-135m-instruct" else model)  # None = embedded


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
        return len(tiktoken_encoding(encoding).encode(text, disallowed_special=()))
    from tiktoken.model import encoding_name_for_model

    try:
        encoding = encoding_name_for_model(model)
    except KeyError:
        return len(_hf_tokenizer(model)(text, add_special_tokens=False)["input_ids"])
    return len(tiktoken_encoding(encoding).encode(text, disallowed_special=()))


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
    # True: the tokens are the reservation's worst case, booked for a failed attempt the server may have billed
    # without reporting usage (older ledgers lack the field: they booked such attempts as 0 tokens).
    usage_estimated: bool = False


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
        with self._lock:
            append_records(self.path, [asdict(entry)])
            self.entries.append(entry)
        return entry

    def record(self, call: CallRecord, stage: str) -> LedgerEntry:
        """Price an endpoint's call record and append it; returns the entry."""
        cost = self.price_of(call.model).cost(call.prompt_tokens, call.completion_tokens, batch=self.batch)
        return self.append(LedgerEntry(
            time=time.time(), stage=stage, model=call.model, api=call.api, outcome=call.outcome, status=call.status,
            error=call.error, prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens,
            cost_usd=cost, latency_s=call.latency_s, request_id=call.request_id, attempt=call.attempt,
            usage_estimated=call.usage_estimated,
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

    @property
    def reserved_usd(self) -> float:
        """Return the dollars reserved by requests in flight (not yet recorded)."""
        return self._reserved_usd

    def call_budget(self, model: str, prompt_tokens: int, max_completion_tokens: int) -> "CallBudget":
        """Return the budget of one call to ``model`` for ``Endpoint.complete(budget=...)``: each attempt, retries
        included, reserves this request's worst case, and a failed attempt the server may have billed is booked
        at that worst case."""
        return CallBudget(self, model, prompt_tokens, max_completion_tokens)

    def repriced_usd(self, model: str, batch: bool = False) -> float:
        """Return what the recorded tokens would have cost at ``model``'s prices."""
        rates = price(model)
        return sum(rates.cost(entry.prompt_tokens, entry.completion_tokens, batch=batch) for entry in self.entries)

    # ---- sums
    @property
    def total_usd(self) -> float:
        return sum(entry.cost_usd for entry in self.entries)

    @property
    def total_tokens(self) -> int:
        """Return the prompt plus completion tokens of every recorded attempt."""
        return sum(entry.prompt_tokens + entry.completion_tokens for entry in self.entries)

    def frame(self) -> pd.DataFrame:
        """Return every entry as a row."""
        return pd.DataFrame([asdict(entry) for entry in self.entries], columns=list(LedgerEntry.__dataclass_fields__))

    def summary(self, by: str = "model") -> pd.DataFrame:
        """Return calls, retries, errors, tokens, dollars and mean latency grouped ``by`` model or stage; ``estimated``
        counts the failed attempts whose tokens are the worst-case estimate (the server may have billed them)."""
        frame = self.frame()
        grouped = frame.groupby(by)
        return pd.DataFrame({
            "calls": grouped.size(),
            "ok": grouped["outcome"].apply(lambda s: int((s == "ok").sum())),
            "retries": grouped["outcome"].apply(lambda s: int((s == "retry").sum())),
            "errors": grouped["outcome"].apply(lambda s: int((s == "error").sum())),
            "estimated": grouped["usage_estimated"].apply(lambda s: int(s.sum())),
            "prompt_tokens": grouped["prompt_tokens"].sum(),
            "completion_tokens": grouped["completion_tokens"].sum(),
            "cost_usd": grouped["cost_usd"].sum(),
            "mean_latency_s": grouped["latency_s"].mean(),
        })


class CallBudget:
    """The reservations of one call's attempts (``llm.AttemptBudget``): one worst case per attempt held.

    A retry reserves again before the failed attempt's reservation is given back, so the budget never counts
    on money a retry might spend; when the ledger refuses, ``reserve`` raises :class:`BudgetExceeded`.
    """

    def __init__(self, ledger: Ledger, model: str, prompt_tokens: int, max_completion_tokens: int):
        self.ledger, self.model = ledger, model
        self.estimated_usage = (prompt_tokens, max_completion_tokens)
        self._reservations: list[float] = []

    @property
    def held(self) -> int:
        """Return how many attempts' reservations are held now."""
        return len(self._reservations)

    def reserve(self) -> None:
        """Reserve one more attempt's worst case; BudgetExceeded if it might not fit."""
        self._reservations.append(self.ledger.reserve(self.model, *self.estimated_usage))

    def release(self) -> None:
        """Give back the oldest reservation (its attempt has been recorded)."""
        self.ledger.release(self._reservations.pop(0))

    def release_all(self) -> None:
        """Give back every reservation still held."""
        while self._reservations:
            self.release()


def _read_entries(path: Path) -> list[LedgerEntry]:
    """Return the entries of an existing ledger (a torn last line from a kill is dropped)."""
    entries = []
    for number, record in read_records(path):
        try:
            entries.append(LedgerEntry(**record))
        except TypeError as error:
            raise ValueError(f"{path}, line {number}: not a ledger entry ({error})") from None
    return entries



# --------------------------------------------------------------------------- generation cost (chapter 3)


@dataclass(frozen=True)
class GenerationCost:
    model: str
    batch: bool
    keep_rate: float      # kept instructions per generated task
    requests: float
    cost_usd: float


def generation_cost(n_instructions: int, keep_rate: float, prompt_tokens: float, completion_tokens: float,
                    tasks_per_completion: int, model: str, batch: bool = False) -> GenerationCost:
    """Return the requests and dollars needed to keep ``n_instructions`` at a given keep rate.

    Each request yields ``tasks_per_completion`` generated tasks, of which ``keep_rate`` survive
    parsing, filters and de-duplication.
    """
    if not 0 < keep_rate <= 1:
        raise ValueError(f"keep_rate={keep_rate}: must be in (0, 1]")
    requests = n_instructions / (tasks_per_completion * keep_rate)
    per_request = price(model).cost(prompt_tokens, completion_tokens, batch=batch)
    return GenerationCost(model, batch, keep_rate, requests, requests * per_request)


def generation_cost_table(n_instructions: int, keep_rates, prompt_tokens: float, completion_tokens: float,
                          tasks_per_completion: int, models) -> pd.DataFrame:
    """Return dollars for each (model, batch) row and keep-rate column."""
    rows = {}
    for model, batch in models:
        label = f"{model} ({price(model).as_of}{', batch API' if batch else ''})"
        rows[label] = {f"keep {rate:.0%}": generation_cost(n_instructions, rate, prompt_tokens, completion_tokens,
                                                            tasks_per_completion, model, batch).cost_usd
                       for rate in keep_rates}
    return pd.DataFrame(rows).T


def plot_generation_cost(n_instructions: int, prompt_tokens: float, completion_tokens: float, tasks_per_completion: int,
                         models, claimed_usd: float = 500.0, marks: dict[str, float] | None = None):
    """Return a log-scale plot of generation dollars against keep rate, one line per model, the claim as a line."""
    import matplotlib.pyplot as plt
    import numpy as np

    rates = np.linspace(0.02, 1.0, 99)
    figure, axis = plt.subplots(figsize=(8, 4), constrained_layout=True)
    for model, batch in models:
        dollars = [generation_cost(n_instructions, rate, prompt_tokens, completion_tokens, tasks_per_completion, model,
                                   batch).cost_usd for rate in rates]
        axis.plot(rates, dollars, label=f"{model}{' (batch)' if batch else ''}, {price(model).as_of} prices")
    axis.axhline(claimed_usd, color="black", linestyle="--", label=f"the paper: < ${claimed_usd:,.0f}")
    for label, rate in (marks or {}).items():
        axis.axvline(rate, color="grey", linestyle=":")
        axis.annotate(label, (rate, claimed_usd), rotation=90, va="bottom", ha="right", fontsize=8)
    axis.set_yscale("log")
    axis.set_xlabel("keep rate (kept instructions per generated task)")
    axis.set_ylabel(f"dollars for {n_instructions:,} kept")
    axis.set_title(f"Generation cost of {n_instructions:,} kept instructions against the keep rate")
    axis.legend(fontsize=8, loc="upper right")  # the curves fall to the right: the corner stays clear of them
    return figure
