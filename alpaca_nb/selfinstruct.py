"""Self-instruct generation as Alpaca ran it: prompt, parse, filter, de-duplicate, keep.

Taught in chapter 2 (book/02_self_instruct.md). Faithful to stanford_alpaca's
generate_instruction.py where it matters (prompt layout, sampling defaults, block parsing, the
filter rules, ROUGE-L > 0.7 against every kept instruction); robust where upstream was not
(resumable after SIGKILL, a hard budget cap, every call in the ledger). This module holds the loop (the
teacher, the asyncio requests, resuming) and chapter 2's ways of asking (``book_funnels``); the prompt, parsing
and filters are ``selfinstruct_prompts``', the format constraints ``format_constraints``', a run's folder
``generation_runs``', the prompt's price ``selfinstruct_inspection``' and the charts ``plots``' (all re-exported).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from alpaca_nb.api_costs import CallBudget
from alpaca_nb.costs import BudgetExceeded, Ledger, count_tokens
from alpaca_nb.data import load_seed_tasks
from alpaca_nb.format_constraints import FORMATS, FormatConstraint, format_constraint
from alpaca_nb.generation_runs import (
    GenerationReport, copy_first_requests, funnel_table, kept_records, load_run, read_generated, read_requests,
)
from alpaca_nb.jsonl import append_records
from alpaca_nb.llm import AuthenticationError, CallRecord, Endpoint, LLMError, ServerExitedError, local_server
from alpaca_nb.plots import plot_funnel, plot_funnels, plot_similarity_histograms
from alpaca_nb.progress import progress_bar
from alpaca_nb.rouge import RougeLFilter
from alpaca_nb.selfinstruct_inspection import PromptPrice, RequestTokens, max_similarities, price_prompt, request_tokens
from alpaca_nb.selfinstruct_prompts import (
    BLACKLIST, BLOCK_SEPARATOR, CHAT_SYSTEM_PROMPT, FIELDS, FILTER_REASONS, NO_INPUT, NUMBER_MARK, Candidate,
    ParsedBlocks, PromptParts, assemble_prompt, encode_chat_prompt, encode_completion, encode_prompt, filter_reason,
    parse_completion, prompt_parts,
)

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


# --------------------------------------------------------------------------- the loop


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
