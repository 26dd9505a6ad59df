"""Self-instruct generation as Alpaca ran it: prompt, parse, filter, de-duplicate, keep.

Taught in chapter 2 (book/02_self_instruct.md). Faithful to stanford_alpaca's
generate_instruction.py where it matters (prompt layout, sampling defaults, block parsing, the
filter rules, ROUGE-L > 0.7 against every kept instruction); robust where upstream was not
(resumable after SIGKILL, a hard budget cap, every call in the ledger).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import random
import re
import shutil
import string
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Sequence

from alpaca_nb.api_costs import CallBudget
from alpaca_nb.costs import BudgetExceeded, Ledger, count_tokens
from alpaca_nb.data import AlpacaRecord, load_prompt_template, load_seed_tasks
from alpaca_nb.jsonl import append_records, read_records
from alpaca_nb.llm import AuthenticationError, CallRecord, Endpoint, LLMError, ServerExitedError, local_server
from alpaca_nb.progress import progress_bar
from alpaca_nb.rouge import RougeLFilter

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BLACKLIST",
    "NUMBER_MARK",
    "PromptParts",
    "assemble_prompt",
    "prompt_parts",
    "FILTER_REASONS",
    "Candidate",
    "FORMATS",
    "FormatConstraint",
    "Funnel",
    "book_funnels",
    "copy_first_requests",
    "live_funnel",
    "GenerationReport",
    "ParsedBlocks",
    "PromptPrice",
    "RougeLFilter",
    "SamplingSettings",
    "encode_chat_prompt",
    "encode_completion",
    "encode_prompt",
    "filter_reason",
    "format_constraint",
    "funnel_table",
    "generate",
    "kept_records",
    "load_run",
    "max_similarities",
    "parse_completion",
    "plot_funnel",
    "plot_funnels",
    "plot_similarity_histograms",
    "price_prompt",
    "read_generated",
    "read_requests",
    "request_tokens",
    "open_teacher",
    "teacher_endpoint",
]

# stanford_alpaca generate_instruction.py: words a text-only model cannot act on.
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
FILTER_REASONS = ("too_short", "too_long", "blacklisted_word", "write_a_program", "starts_with_punctuation",
                  "starts_non_ascii")
_BLACKLIST_PATTERNS = [re.compile(rf"\b({re.escape(word)})\b", flags=re.IGNORECASE) for word in BLACKLIST]
CHAT_SYSTEM_PROMPT = ("You continue numbered task lists. Reply with the remaining tasks only, in exactly the format "
                      "shown: 'N. Instruction:', 'N. Input:', 'N. Output:', tasks separated by a line '###'.")


@dataclass(frozen=True)
class SamplingSettings:
    """Upstream's decoding settings (OpenAIDecodingArguments in generate_instruction.py)."""

    num_prompt_instructions: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 3072
    stop: tuple[str, ...] = ("\n20", "20.")

    def request_args(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "stop": list(self.stop)}


class Candidate(NamedTuple):
    instruction: str
    input: str
    output: str


class ParsedBlocks(list):
    """The parsed (instruction, input, output) candidates, with counts of the blocks that were dropped."""

    def __init__(self, candidates: Sequence[Candidate] = (), malformed: int = 0, truncated: int = 0):
        super().__init__(candidates)
        self.malformed = malformed  # blocks that did not split into instruction, input and output
        self.truncated = truncated  # the last block, dropped because the completion hit max_tokens


# --------------------------------------------------------------------------- prompt


def _normalise_instruction(instruction: str) -> str:
    return re.sub(r"\s+", " ", instruction).strip().rstrip(":")


def encode_prompt(seed_examples: Sequence[Any], template: str | None = None) -> str:
    """Return the completion prompt: prompt.txt, numbered seed blocks separated by ###, then 'N. Instruction:'."""
    prompt = (load_prompt_template() if template is None else template) + "\n"
    prompt += "".join(f"{BLOCK_SEPARATOR}\n" + _encode_block(number, example)
                      for number, example in enumerate(seed_examples, start=1))
    prompt += f"{BLOCK_SEPARATOR}\n"
    prompt += _header(len(seed_examples) + 1, FIELDS[0])
    return prompt


# The block layout, shared by encode_prompt, parse_completion and the format constraints below.
FIELDS = ("Instruction", "Input", "Output")
BLOCK_SEPARATOR = "###"
NO_INPUT = "<noinput>"


def _header(number: int, field: str) -> str:
    return f"{number}. {field}:"


def _encode_block(number: int, example: Any) -> str:
    task_input = example.input if example.input.strip() else NO_INPUT
    instruction, input_field, output = (_header(number, field) for field in FIELDS)
    return (f"{instruction} {_normalise_instruction(example.instruction)}\n"
            f"{input_field}\n{task_input}\n"
            f"{output}\n{example.output}\n")


def encode_completion(examples: Sequence[Any], first_number: int = 4) -> str:
    """Return the completion a teacher would write for ``examples``: the text after 'N. Instruction:'."""
    text = f"{BLOCK_SEPARATOR}\n".join(_encode_block(number, example)
                                       for number, example in enumerate(examples, start=first_number))
    return text.removeprefix(_header(first_number, FIELDS[0]))


def encode_chat_prompt(seed_examples: Sequence[Any], template: str | None = None) -> list[dict[str, str]]:
    """Return chat messages carrying the same prompt, for endpoints that only serve chat models."""
    return [{"role": "system", "content": CHAT_SYSTEM_PROMPT},
            {"role": "user", "content": encode_prompt(seed_examples, template)}]


# --------------------------------------------------------------------------- parse and filter


def parse_completion(text: str, num_prompt_instructions: int = 3, truncated: bool = False) -> ParsedBlocks:
    """Return the candidates in a completion, split as upstream does; never raises.

    The completion continues after 'N. Instruction:', so that header is put back before splitting
    on ###. A chat model that repeats the header is tolerated.
    """
    first = num_prompt_instructions + 1
    body = str(text)
    body = re.sub(rf"^\s*{first}\.\s+{FIELDS[0]}:", "", body, count=1)
    blocks = re.split(re.escape(BLOCK_SEPARATOR), _header(first, FIELDS[0]) + body)
    dropped_truncated = 0
    if truncated and blocks:
        blocks, dropped_truncated = blocks[:-1], 1
    candidates, malformed = [], 0
    for offset, block in enumerate(blocks):
        parts = re.split(rf"{first + offset}\.\s+({'|'.join(FIELDS)}):", block)
        if len(parts) != 7:
            malformed += bool(block.strip())  # an empty tail after the last ### is no block at all
            continue
        task_input = parts[4].strip()
        candidates.append(Candidate(parts[2].strip(), "" if task_input.lower() == NO_INPUT else task_input,
                                    parts[6].strip()))
    return ParsedBlocks(candidates, malformed, dropped_truncated)


# --------------------------------------------------------------------------- format constraints


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


def filter_reason(instruction: str) -> str | None:
    """Return None to keep the instruction, else the upstream rule that rejects it (see FILTER_REASONS)."""
    words = instruction.split()
    if len(words) <= 3:
        return "too_short"
    if len(words) > 150:
        return "too_long"
    if any(pattern.search(instruction) for pattern in _BLACKLIST_PATTERNS):
        return "blacklisted_word"
    if instruction.startswith("Write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_non_ascii"
    return None


# --------------------------------------------------------------------------- files


def read_generated(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Return the kept records of a generation run (generated.jsonl)."""
    return [record for _, record in read_records(Path(out_dir) / "generated.jsonl")]


def kept_records(out_dir: str | os.PathLike) -> list[AlpacaRecord]:
    """Return the kept instructions of a run as Alpaca records (instruction, input, output)."""
    return [AlpacaRecord(record["instruction"], record["input"], record["output"]) for record in read_generated(out_dir)]


def read_requests(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Return one entry per finished request (requests.jsonl): its funnel counters and the raw completion."""
    return [entry for _, entry in read_records(Path(out_dir) / "requests.jsonl")]


# --------------------------------------------------------------------------- the loop


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


class _Run:
    """State of one generation run over ``out_dir``, rebuilt from its files on restart."""

    def __init__(self, endpoint: Endpoint, out_dir: Path, seed_tasks: Sequence[Any], template: str | None,
                 sampling: SamplingSettings, seed: int, ledger: Ledger, threshold: float,
                 constraint: FormatConstraint | None = None):
        self.endpoint, self.out_dir, self.seed_tasks = endpoint, out_dir, list(seed_tasks)
        self.constraint = constraint
        self.template, self.sampling, self.seed, self.ledger = template, sampling, seed, ledger
        kept = read_generated(out_dir)
        self.done = {entry["request"] for entry in read_requests(out_dir)}
        self.report = load_run(out_dir)
        self.pool = RougeLFilter([task.instruction for task in self.seed_tasks], threshold=threshold)
        for record in kept:
            self.pool.add(record["instruction"])

    def prompt(self, request: int) -> str | list[dict[str, str]]:
        # Seeds depend only on (seed, request number): a resumed run asks the same questions.
        examples = random.Random(f"{self.seed}-{request}").sample(self.seed_tasks, self.sampling.num_prompt_instructions)
        if self.endpoint.api == "chat":
            return encode_chat_prompt(examples, self.template)
        return encode_prompt(examples, self.template)

    def worst_case_prompt_tokens(self, prompt: str | list[dict[str, str]]) -> int:
        text = prompt if isinstance(prompt, str) else "\n".join(message["content"] for message in prompt)
        overhead = 0 if isinstance(prompt, str) else 8 * len(prompt)  # chat-format tokens per message
        return count_tokens(text, self.ledger.price_as or self.endpoint.model) + overhead

    def absorb(self, request: int, completion: Any) -> None:
        """Parse, filter and de-duplicate one completion; append what is kept, then mark the request done."""
        text = self.constraint.completion_text(completion.text) if self.constraint else completion.text
        parsed = parse_completion(text, self.sampling.num_prompt_instructions,
                                  truncated=completion.finish_reason == "length")
        counters = Counter(blocks=len(parsed) + parsed.malformed + parsed.truncated, malformed=parsed.malformed,
                           truncated=parsed.truncated)
        kept = []
        for candidate in parsed:
            reason = filter_reason(candidate.instruction)
            if reason is None:
                similarity = self.pool.most_similar(candidate.instruction)
                if similarity.max_similarity > self.pool.threshold:
                    reason = "near_duplicate"
                else:
                    self.pool.add(candidate.instruction)
                    kept.append({**candidate._asdict(), "max_similarity": similarity.max_similarity,
                                 "most_similar": similarity.most_similar, "request": request,
                                 "request_id": completion.request_id})
            if reason:
                counters[reason] += 1
        counters["kept"] = len(kept)
        append_records(self.out_dir / "generated.jsonl", kept)
        append_records(self.out_dir / "requests.jsonl", [{"request": request, "request_id": completion.request_id,
                                                         "finish_reason": completion.finish_reason,
                                                         "completion_tokens": completion.completion_tokens,
                                                         "counters": dict(counters), "completion": completion.text}])
        self.done.add(request)
        self.report.kept += len(kept)
        self.report.requests += 1
        self.report.counters.update(counters)


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


def generate(
    endpoint: Endpoint,
    num_instructions: int,
    out_dir: str | os.PathLike,
    budget_usd: float | None = None,
    concurrency: int = 8,
    seed: int = 0,
    *,
    seed_tasks: Sequence[Any] | None = None,
    template: str | None = None,
    sampling: SamplingSettings = SamplingSettings(),
    threshold: float = 0.7,
    price_as: str | None = None,
    max_requests: int | None = None,
    max_consecutive_failures: int = 5,
    progress: bool = True,
    constraint: FormatConstraint | None = None,
) -> GenerationReport:
    """Generate until ``num_instructions`` records are kept in ``out_dir/generated.jsonl``; returns a report.

    ``max_requests`` also stops the run after that many finished requests (counted across restarts),
    which bounds the time and money a run can take whatever the keep rate turns out to be.
    Resumable: run the same call again after any interruption (SIGKILL included) and it continues.
    Every call attempt lands in ``out_dir/ledger.jsonl``; no request, and no retry, starts whose worst-case
    cost could push spending over ``budget_usd``. Ctrl-C (KeyboardInterrupt, in a script or in Jupyter)
    cancels the requests in flight, starts no other and raises; the files stay ready to resume.
    ``constraint`` (a :class:`FormatConstraint`) makes the teacher keep the block layout; None sends
    upstream's unconstrained request.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out / "ledger.jsonl", budget_usd=budget_usd, price_as=price_as)
    ledger.price_of(endpoint.model)  # an unpriced model fails here, before any request is sent
    if constraint is not None and constraint.first_number != sampling.num_prompt_instructions + 1:
        raise ValueError(f"constraint.first_number={constraint.first_number} must follow the prompt's "
                         f"{sampling.num_prompt_instructions} seed tasks")
    run = _Run(endpoint, out, seed_tasks if seed_tasks is not None else load_seed_tasks(), template, sampling, seed,
               ledger, threshold, constraint)
    previous_hook = endpoint.on_call
    endpoint.on_call = lambda call: _record_call(ledger, call, previous_hook)
    try:
        limits = _Limits(num_instructions, max_requests, concurrency, max_consecutive_failures)
        _run_to_completion(_drive(run, limits, progress))
    finally:
        endpoint.on_call = previous_hook
    run.report.spent_usd = ledger.total_usd
    return run.report


def _run_to_completion(coroutine: Any) -> None:
    """Run ``coroutine`` on a fresh event loop, in a worker thread when one is already running (Jupyter).

    Ctrl-C cancels it either way, and KeyboardInterrupt is raised once it has cleaned up: ``asyncio.run`` turns
    SIGINT into the cancellation of its task; in the worker thread, the interrupt lands in this (main) thread,
    which cancels the task across threads instead of waiting for the whole run to end.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)
        return
    handle = _TaskHandle()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as worker:
        running = worker.submit(asyncio.run, handle.run(coroutine))
        try:
            running.result()
        except KeyboardInterrupt:
            handle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                running.result()  # the requests in flight are cancelled and booked
            raise


class _TaskHandle:
    """The task and loop of a coroutine run in another thread, so that this thread can cancel it."""

    def __init__(self) -> None:
        self._started = concurrent.futures.Future()

    async def run(self, coroutine: Any) -> Any:
        self._started.set_result((asyncio.get_running_loop(), asyncio.current_task()))
        return await coroutine

    def cancel(self) -> None:
        loop, task = self._started.result()
        loop.call_soon_threadsafe(task.cancel)


def _record_call(ledger: Ledger, call: CallRecord, previous_hook: Any) -> None:
    ledger.record(call, stage="generate")
    if previous_hook is not None:
        previous_hook(call)


@dataclass(frozen=True)
class _Limits:
    target: int
    max_requests: int | None
    concurrency: int
    max_failures: int

    def may_start(self, run: _Run, in_flight: int) -> bool:
        """Return True while another request may start (target not met, no stop, under every limit), and the
        requests in flight, at the run's kept-per-request so far, are not expected to reach the target already:
        with many in flight, finishing them overshoots by their whole yield, time and money spent for nothing.
        If they fall short, requests start again as they finish."""
        report = run.report
        under_requests = self.max_requests is None or report.requests + in_flight < self.max_requests
        expected = report.kept + (in_flight * report.kept / report.requests if report.requests else 0)
        return (in_flight < self.concurrency and expected < self.target and under_requests
                and not report.stopped_reason)


async def _drive(run: _Run, limits: _Limits, progress: bool) -> None:
    """Keep up to ``concurrency`` requests in flight until the target, a limit, the budget or failures stop it."""
    target = limits.target
    bar = progress_bar(total=target, initial=min(run.report.kept, target), desc="kept", disable=not progress)
    in_flight: set[asyncio.Task] = set()
    next_request, consecutive_failures = 0, 0
    try:
        while run.report.kept < target and not run.report.stopped_reason:
            while limits.may_start(run, len(in_flight)):
                while next_request in run.done:
                    next_request += 1
                task = _start(run, next_request)
                if task is None:
                    break
                in_flight.add(task)
                next_request += 1
            if not in_flight:
                break
            finished, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                consecutive_failures = 0 if task.result() else consecutive_failures + 1
            if consecutive_failures >= limits.max_failures and not run.report.stopped_reason:
                run.report.stopped_reason = (f"stopped: {consecutive_failures} requests in a row failed after retries; "
                                             f"the last: {run.report.last_error}")
            bar.n = min(run.report.kept, target)
            bar.set_postfix(_postfix(run), refresh=True)
    except (asyncio.CancelledError, KeyboardInterrupt):
        # Ctrl-C: a request cancelled in flight wrote nothing (absorb writes both files at once, after the
        # reply), so a resumed run asks it again; its attempt is in the ledger, as the server may bill it.
        for task in in_flight:
            task.cancel()
        raise
    finally:
        if in_flight:
            await asyncio.wait(in_flight)
        bar.n = min(run.report.kept, target)
        bar.set_postfix(_postfix(run), refresh=True)
        bar.close()
    if not run.report.stopped_reason:
        reached = run.report.kept >= target
        run.report.stopped_reason = "done: target reached" if reached else "done: request limit reached"


def _start(run: _Run, request: int) -> asyncio.Task | None:
    """Start one request if the budget allows it; None (with the reason in the report) if not."""
    prompt = run.prompt(request)
    budget = run.ledger.call_budget(run.endpoint.model, run.worst_case_prompt_tokens(prompt), run.sampling.max_tokens)
    try:
        budget.reserve()  # the first attempt's reservation; acomplete reserves again for each retry
    except BudgetExceeded as error:
        run.report.stopped_reason = f"stopped before the budget could be exceeded: {error}"
        return None
    return asyncio.get_running_loop().create_task(_request(run, request, prompt, budget))


async def _request(run: _Run, request: int, prompt: Any, budget: CallBudget) -> bool:
    """Send one request and absorb its completion; returns False if it failed for good."""
    try:
        extra = run.constraint.request_args() if run.constraint else {}
        completion = await run.endpoint.acomplete(prompt, budget=budget, seed=run.seed * 1_000_003 + request,
                                                  **run.sampling.request_args(), **extra)
    except BudgetExceeded as error:  # a retry did not fit
        run.report.stopped_reason = f"stopped before the budget could be exceeded: {error}"
        return False
    except (AuthenticationError, ServerExitedError) as error:  # no later request can succeed
        run.report.stopped_reason = f"stopped: {error}"
        return False
    except LLMError as error:
        run.report.failed_requests += 1
        run.report.last_error = str(error)
        return False
    finally:
        budget.release_all()
    run.absorb(request, completion)
    return True


def _postfix(run: _Run) -> dict[str, Any]:
    counters = run.report.counters
    rejected = {reason: counters[reason] for reason in (*FILTER_REASONS, "near_duplicate", "malformed") if counters[reason]}
    return {"requests": run.report.requests, "$": f"{run.ledger.total_usd:.4f}", **rejected}


@contextlib.contextmanager
def open_teacher(base_url: str | None, model: str | None, api: str | None = None, timeout: float = 600.0,
                 announce: Callable[[str], None] | None = None) -> Iterator[Endpoint]:
    """Yield the teacher at ``base_url`` (``model`` names it there), or the embedded llama.cpp server, started
    here and stopped on exit, when ``base_url`` is None. ``api`` defaults to "chat" for an API teacher
    (gpt-4o-mini and its kind serve chat only) and to "completions" for the embedded server (upstream's raw
    prompt). ``announce`` receives one line naming a started server and its pid.
    """
    if base_url is not None:
        if not model:
            raise ValueError(f"a teacher at {base_url} needs its model name (--model)")
        yield Endpoint(base_url, model, api=api or "chat", timeout=timeout)
        return
    with local_server() as server:
        if announce is not None:
            announce(f"started the embedded llama.cpp server at {server.base_url} (pid {server.pid})")
        yield Endpoint(server.base_url, model or server.model, api=api or "completions", timeout=timeout)


def teacher_endpoint(profile: Any, api: str | None = None) -> contextlib.AbstractContextManager[Endpoint]:
    """Return the profile's teacher (``open_teacher``): the embedded llama.cpp server on a laptop, the named API
    on a cluster."""
    return open_teacher(profile.teacher_base_url, profile.teacher_model if profile.teacher_base_url else None, api)


# --------------------------------------------------------------------------- the book's runs (chapters 2-4)


@dataclass(frozen=True)
class Funnel:
    """One way of asking the teacher: sampling settings and an optional format constraint."""

    name: str
    folder: str
    sampling: SamplingSettings
    constraint: FormatConstraint | None


def book_funnels(profile: Any) -> list[Funnel]:
    """Return chapter 2's three funnels, all on the same prompts: upstream as Alpaca ran it, then two that each
    change one thing from it: a cooler temperature (``compare_temperature``), or the format constraint (at the
    live run's ``generate_temperature``)."""
    upstream = SamplingSettings(max_tokens=profile.generate_max_tokens)
    cooler = replace(upstream, temperature=profile.compare_temperature)
    live = replace(upstream, temperature=profile.generate_temperature)
    constraint = format_constraint(profile.constrained_format, upstream.num_prompt_instructions)
    return [
        Funnel(f"upstream prompt, temperature {upstream.temperature:.1f} (as Alpaca)", "upstream-t1", upstream, None),
        Funnel(f"upstream prompt, temperature {cooler.temperature:.1f}", "upstream-cooler", cooler, None),
        Funnel(f"{profile.constrained_format}-constrained, temperature {live.temperature:.1f}", "constrained", live,
               constraint),
    ]


def live_funnel(profile: Any) -> Funnel:
    """Return the funnel the live run continues: the one of the profile's ``generate_format``."""
    folder = "upstream-t1" if profile.generate_format == "upstream" else "constrained"
    return next(funnel for funnel in book_funnels(profile) if funnel.folder == folder)


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


# --------------------------------------------------------------------------- inspection (chapter 2)


@dataclass(frozen=True)
class PromptPrice:
    prompt: str
    prompt_tokens: int
    prompt_usd: float
    worst_case_usd: float  # prompt plus a full max_tokens completion


def price_prompt(seed_examples: Sequence[Any], model: str = "text-davinci-003", max_tokens: int = 3072,
                 template: str | None = None) -> PromptPrice:
    """Return the exact completion prompt for these seeds, its token count and its cost at ``model``'s prices."""
    from alpaca_nb.costs import price

    prompt = encode_prompt(seed_examples, template)
    tokens = count_tokens(prompt, model)
    rates = price(model)
    return PromptPrice(prompt, tokens, rates.cost(tokens, 0), rates.cost(tokens, max_tokens))


# Where a seed block's number goes in PromptParts' texts: a character no seed task holds.
NUMBER_MARK = "\x00"


@dataclass(frozen=True)
class PromptParts:
    """encode_prompt cut where its token count adds up: before each "###". Any choice of these seeds' prompt is
    ``head`` + each chosen block numbered 1, 2, ... + ``tail`` numbered one past the last, and its tokens the sum
    of the parts' tokens, each number's tokens swapped for "1"'s. The static book's prompt widget does that
    arithmetic in the page (``assemble_prompt`` is its Python twin; tests check both against count_tokens)."""

    head: str
    head_tokens: int
    blocks: list[str]          # "###\n" + each seed's block, NUMBER_MARK where its number goes
    block_tokens: list[int]    # each block's tokens when numbered 1
    tail: str                  # "###\n" + the next task's header, NUMBER_MARK for its number
    tail_tokens: int           # numbered 1
    number_tokens: list[int]   # tokens of str(n) at index n, for 0 to len(blocks) + 1
    marks: list[int]           # how often NUMBER_MARK occurs in each block (3: instruction, input, output)


def prompt_parts(seed_examples: Sequence[Any], model: str = "text-davinci-003", template: str | None = None) -> PromptParts:
    """Return encode_prompt's parts for every one of ``seed_examples``, with their token counts for ``model``."""
    head = (load_prompt_template() if template is None else template) + "\n"
    blocks = [f"{BLOCK_SEPARATOR}\n" + _encode_block(NUMBER_MARK, example) for example in seed_examples]  # type: ignore[arg-type]
    if any(NUMBER_MARK in str(value) for example in seed_examples for value in vars(example).values()):
        raise ValueError("a seed task holds the NUL character, which PromptParts uses to mark a block's number")
    tail = f"{BLOCK_SEPARATOR}\n" + _header(NUMBER_MARK, FIELDS[0])  # type: ignore[arg-type]
    return PromptParts(head, count_tokens(head, model), blocks,
                       [count_tokens(_numbered(block, 1), model) for block in blocks], tail,
                       count_tokens(_numbered(tail, 1), model),
                       [count_tokens(str(number), model) for number in range(len(blocks) + 2)],
                       [block.count(NUMBER_MARK) for block in blocks])


def _numbered(text: str, number: int) -> str:
    return text.replace(NUMBER_MARK, str(number))


def assemble_prompt(parts: PromptParts, chosen: Sequence[int]) -> tuple[str, int]:
    """Return the prompt for the seeds at ``chosen`` and its tokens, by the parts' arithmetic alone."""
    def renumbered(tokens: int, marks: int, number: int) -> int:
        return tokens + marks * (parts.number_tokens[number] - parts.number_tokens[1])

    prompt = parts.head + "".join(_numbered(parts.blocks[index], number) for number, index in enumerate(chosen, start=1))
    tokens = parts.head_tokens + sum(renumbered(parts.block_tokens[index], parts.marks[index], number)
                                     for number, index in enumerate(chosen, start=1))
    return prompt + _numbered(parts.tail, len(chosen) + 1), tokens + renumbered(parts.tail_tokens, 1, len(chosen) + 1)


@dataclass(frozen=True)
class RequestTokens:
    prompt_tokens: float      # mean over sampled seed triples
    completion_tokens: float  # mean of a full completion of ``tasks_per_completion`` real tasks
    tasks_per_completion: int


def request_tokens(seed_tasks: Sequence[Any], written_tasks: Sequence[Any], model: str = "text-davinci-003",
                   samples: int = 50, seed: int = 0, tasks_per_completion: int = 16) -> RequestTokens:
    """Return the mean prompt and completion tokens of one upstream request, measured on real texts.

    Prompts sample three seeds as the generator does; completions are ``tasks_per_completion``
    real generated tasks in the upstream block format: tasks 4 to 19, since the stop sequence
    "\\n20" ends the list of 20 before its last task.
    """
    rng = random.Random(seed)
    prompts = [count_tokens(encode_prompt(rng.sample(list(seed_tasks), 3)), model) for _ in range(samples)]
    completions = [count_tokens(encode_completion(rng.sample(list(written_tasks), tasks_per_completion)), model)
                   for _ in range(samples)]
    return RequestTokens(sum(prompts) / samples, sum(completions) / samples, tasks_per_completion)


def max_similarities(texts: Sequence[str], pool: Sequence[str]) -> list[float]:
    """Return each text's exact ROUGE-L max similarity to ``pool`` (the pool does not grow)."""
    reference = RougeLFilter(pool)
    return [reference.max_similarity(text) for text in texts]


def plot_funnel(report: GenerationReport):
    """Return a bar chart of the funnel and the rejections by reason."""
    import matplotlib.pyplot as plt

    funnel = report.funnel()
    reasons = {reason: report.counters[reason] for reason in ("malformed", "truncated", *FILTER_REASONS, "near_duplicate")}
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6), constrained_layout=True)
    left.bar(list(funnel), list(funnel.values()), color=["#8da0cb", "#8da0cb", "#66c2a5", "#1b9e77"])
    left.set_title("generation funnel")
    left.tick_params(axis="x", labelrotation=15)
    right.barh(list(reasons)[::-1], list(reasons.values())[::-1], color="#fc8d62")
    right.set_title("blocks lost, by reason")
    right.set_xlabel("blocks")
    return figure


def plot_funnels(reports: Mapping[str, GenerationReport]):
    """Return grouped bars, one group per funnel stage and one bar per run, each labelled with its count.

    The axis is logarithmic (with zero drawn at the bottom) so that a stage of 1 next to one of 100 stays visible.
    """
    import matplotlib.pyplot as plt

    stages = ["generated blocks", "parsed", "passed filters", "kept (not near-duplicates)"]
    figure, axis = plt.subplots(figsize=(11, 4), constrained_layout=True)
    width = 0.8 / max(1, len(reports))
    for index, (name, report) in enumerate(reports.items()):
        counts = [report.funnel()[stage] for stage in stages]
        positions = [stage + (index - (len(reports) - 1) / 2) * width for stage in range(len(stages))]
        bars = axis.bar(positions, [max(count, 0.8) for count in counts], width, label=name)
        axis.bar_label(bars, labels=[f"{count:,}" for count in counts], fontsize=8, padding=2)
    axis.set_yscale("log")
    axis.set_ylim(0.7, None)
    axis.set_xticks(range(len(stages)), stages)
    axis.set_ylabel("blocks (log scale)")
    axis.set_title("Where the generated blocks went, per way of asking (same prompts)")
    axis.legend(fontsize=8, loc="lower left")
    return figure


def plot_similarity_histograms(similarities: dict[str, Sequence[float]], threshold: float = 0.7):
    """Return overlaid histograms of max ROUGE-L similarity, with the rejection threshold marked."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    bins = [step / 20 for step in range(21)]
    for name, values in similarities.items():
        if not values:  # nothing to draw; say so in the legend rather than divide by zero
            axis.plot([], [], " ", label=f"{name} (n=0)")
            continue
        axis.hist(values, bins=bins, alpha=0.55, density=True, label=f"{name} (n={len(values)})")
    axis.axvline(threshold, color="black", linestyle="--", label=f"rejected above {threshold}")
    axis.set_xlabel("ROUGE-L F against the most similar seed instruction")
    axis.set_ylabel("density")
    axis.legend()
    return figure
