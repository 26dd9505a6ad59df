"""The chat demo of chapter 6: Alpaca's web demo, with its content filter and its watermark.

``ChatDemo.respond`` checks the lengths, asks the content filter about the instruction, streams the reply
(the in-process model through transformers' ``TextIteratorStreamer`` in a worker thread, or any
``Endpoint`` with ``stream=True``) and keeps the exchange in the history. The reply reaches the caller only
through the filter: it is cut into chunks (a sentence, a line, or at most ``CHUNK_WORDS`` words), and the
reply up to a chunk's end is shown only after the filter passed it, so a view never holds flagged text.
``ChatDemo.flag`` appends an exchange and the user's reason to a flags JSONL file, as the release asked its
users to report concerning answers. ``widgets.chat_demo_widget`` is the notebook's view;
``demo_server`` serves the same logic to a class (``alpaca-nb demo``): one model, one ``ChatDemo`` per
visitor (``ChatDemo.for_new_visitor``), and ``VisitorLimits`` on each visitor's requests.

Unlike alpaca-lora's ``generate.py``, whose temperature and top-p sliders changed nothing because it never set
``do_sample``, every control here reaches ``generate``: temperature 0 is greedy decoding, above 0 samples,
more than one beam searches.
"""

from __future__ import annotations

import html
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from alpaca_nb.evaluate import instruction_text
from alpaca_nb.jsonl import append_records
from alpaca_nb.safety import Moderation, moderate, watermarking_config
from alpaca_nb.sft import format_prompt

__all__ = ["CHUNK_WORDS", "ChatDemo", "DecodingSettings", "Exchange", "ServedDemo", "VisitorLimits", "build_prompt",
           "chunk_end", "exchange_html", "history_html", "length_problem", "reply_html", "terms_of_use"]

TEMPLATES = ("alpaca", "chat")
MAX_INSTRUCTION_CHARS = 1000
MAX_INPUT_CHARS = 2000
# The filter reads the reply a chunk at a time: a sentence, a line, or this many words without either.
# Shorter chunks show the reply sooner and cost more filter calls (one API request each with OpenAI's).
CHUNK_WORDS = 8
_WORD = re.compile(r"\S+(\s+)")
_SENTENCE_END = re.compile(r"[.!?…:;][\"'”’)\]]*$")


def terms_of_use(watermarked: bool) -> str:
    """Return the terms shown above the demo; they promise a watermark only where the answers carry one."""
    mark = ("answers carry a watermark that marks them as machine-written" if watermarked else
            "these answers carry NO watermark: they come from an external server, which the demo cannot mark")
    return ("This demo is for research and teaching only, not for commercial use: Alpaca's data (CC BY-NC 4.0) "
            "and LLaMA's licence forbid it. Answers can be wrong, biased or offensive. Every exchange passes a "
            f"content filter before anything is shown, and {mark}. Flag a concerning answer with the button "
            "below it.")


@dataclass(frozen=True)
class DecodingSettings:
    """The demo's controls. ``temperature`` 0 decodes greedily; ``top_k`` 0 turns top-k off."""

    template: str = "alpaca"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    max_new_tokens: int = 128
    watermark: bool = True

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r}: choose one of {TEMPLATES}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature must be 0 or more, top_p in (0, 1], top_k 0 or more")
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError("num_beams and max_new_tokens must be at least 1")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict[str, Any]:
        """Return the arguments of ``model.generate`` that these settings mean, every one of them explicit."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                                  "do_sample": self.sampling}
        if self.sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # the model's generation_config may carry sampling defaults: greedy means none of them
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.watermark:
            kwargs["watermarking_config"] = watermarking_config(self.temperature if self.sampling else None)
        return kwargs

    def endpoint_kwargs(self) -> dict[str, Any]:
        """Return the OpenAI-API sampling arguments (an API has no beams and no watermark switch)."""
        kwargs: dict[str, Any] = {"max_tokens": self.max_new_tokens, "temperature": self.temperature,
                                  "top_p": self.top_p}
        if self.top_k:
            kwargs["extra_body"] = {"top_k": self.top_k}  # llama.cpp and vLLM servers accept it
        return kwargs


def length_problem(instruction: str, input_text: str = "") -> str | None:
    """Return why the demo refuses these lengths (empty, or over the limit), or None when it accepts them."""
    if not instruction.strip():
        return "Type an instruction first."
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        return f"The instruction has {len(instruction):,} characters; the demo accepts at most {MAX_INSTRUCTION_CHARS:,}."
    if len(input_text) > MAX_INPUT_CHARS:
        return f"The input has {len(input_text):,} characters; the demo accepts at most {MAX_INPUT_CHARS:,}."
    return None


def chunk_end(text: str, start: int = 0) -> int | None:
    """Return where the last whole chunk of ``text[start:]`` ends, or None before the first one is whole.

    A chunk ends at the whitespace after a sentence's end or a line, or after ``CHUNK_WORDS`` words; a word
    counts only once whitespace follows it, since the next streamed piece may still extend it.
    """
    end, words = None, 0
    for match in _WORD.finditer(text, start):
        words += 1
        if words >= CHUNK_WORDS or "\n" in match.group(1) or _SENTENCE_END.search(match.group(0).rstrip()):
            end, words = match.end(), 0
    return end


def build_prompt(instruction: str, input_text: str, template: str, tokenizer: Any = None) -> str | list[dict]:
    """Return the prompt: the Alpaca template's text, or the chat messages (rendered with ``tokenizer`` if given)."""
    if template == "alpaca":
        return format_prompt(instruction, input_text)
    messages = [{"role": "user", "content": instruction_text(instruction, input_text)}]
    if tokenizer is None:
        return messages
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Exchange:
    """One turn of the demo: what was asked, what came back, and what the filter said about either."""

    instruction: str
    input: str
    reply: str
    settings: dict[str, Any]
    blocked: str | None = None            # "instruction" or "reply" when the filter stopped it
    categories: list[str] = field(default_factory=list)
    checker: str = ""
    stopped_by_user: bool = False
    seconds: float = 0.0


def exchange_html(exchange: Exchange) -> str:
    """Return one exchange as the demo's views show it: a blocked reply is named, never shown."""
    asked = html.escape(exchange.instruction) + (f"<br><i>{html.escape(exchange.input)}</i>" if exchange.input else "")
    if exchange.blocked:
        answer = (f"<b>blocked</b>: the content filter flagged the {exchange.blocked} "
                  f"({html.escape(', '.join(exchange.categories))}; checker {html.escape(exchange.checker)})")
    else:
        answer = f"<span style='white-space: pre-wrap'>{html.escape(exchange.reply)}</span>"
    settings = exchange.settings
    decoding = ("greedy" if settings["temperature"] == 0 else
                f"sampled at temperature {settings['temperature']:g}, top-p {settings['top_p']:g}, top-k {settings['top_k']}")
    note = (f"{settings['template']} template, {decoding}, {settings['num_beams']} beam(s), "
            f"{'watermarked' if settings['watermark'] else 'no watermark'}, {exchange.seconds:.1f} s"
            + (", stopped" if exchange.stopped_by_user else ""))
    return f"<p><b>You:</b> {asked}<br><b>Model:</b> {answer}<br><small>{html.escape(note)}</small></p>"


def history_html(history: list[Exchange]) -> str:
    """Return a visitor's exchanges, newest first, as the demo's views show them."""
    return "".join(exchange_html(exchange) for exchange in reversed(history))


def reply_html(text: str) -> str:
    """Return a (passed) reply as it streams into a view."""
    return f"<p style='white-space: pre-wrap'>{html.escape(text)}</p>"


class _StopWhenSet:
    """A stopping criterion that ends generation once ``event`` is set (the Stop button)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatDemo:
    """The demo's logic, for a view to call: ``respond`` yields the reply as it grows; ``flag`` reports one.

    Give ``model`` and ``tokenizer`` (in-process) or ``endpoint`` (any OpenAI-compatible server).
    ``check`` is the content filter (``safety.moderate``, or it bound to an API client).
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, endpoint: Any = None,
                 check: Callable[[str], Moderation] = moderate, flags_path: str | Path = "flags.jsonl"):
        if (model is None) == (endpoint is None):
            raise ValueError("give either model and tokenizer (in-process) or endpoint (a server), not both")
        self.model, self.tokenizer, self.endpoint, self.check = model, tokenizer, endpoint, check
        self.flags_path = Path(flags_path)
        self.history: list[Exchange] = []
        self.stop_event = threading.Event()

    @property
    def can_watermark(self) -> bool:
        """Whether answers can carry the watermark: only the in-process model's, whose logits the demo controls."""
        return self.model is not None

    def for_new_visitor(self) -> ChatDemo:
        """Return a demo for another visitor: the same model, filter and flags file; its own history and Stop."""
        return ChatDemo(self.model, self.tokenizer, self.endpoint, self.check, self.flags_path)

    def warm_up(self) -> None:
        """Answer a short prompt once, unseen (in-process model only), so that the first visitor does not wait
        while the weights are paged in and the kernels initialised (about a second on a laptop)."""
        if self.model is not None:
            for _ in self._stream_model(build_prompt("Say hello.", "", "alpaca"), DecodingSettings(max_new_tokens=2)):
                pass

    def stop(self) -> None:
        """Ask the reply being generated to end now (the Stop button)."""
        self.stop_event.set()

    def respond(self, instruction: str, input_text: str = "", settings: DecodingSettings = DecodingSettings()
                ) -> Iterator[str]:
        """Yield the reply so far, a passed chunk at a time, then keep the exchange in ``history`` (its last entry).

        Nothing is yielded that the filter has not passed: the instruction is checked before generating, and the
        reply up to each chunk's end (``chunk_end``) before it is yielded, then whole at the end. A refused length
        raises ValueError with the message to show. A filtered instruction yields nothing; a filtered reply ends
        generation at once. Either is kept as blocked (the reply too, for a flag), and views name it, never show it.
        Where the demo cannot watermark (an endpoint), the exchange records ``watermark`` False.
        """
        problem = length_problem(instruction, input_text)
        if problem:
            raise ValueError(problem)
        self.stop_event.clear()
        started = time.perf_counter()
        if settings.watermark and not self.can_watermark:
            settings = replace(settings, watermark=False)
        exchange = Exchange(instruction, input_text, "", asdict(settings))
        asked = self.check(instruction_text(instruction, input_text))
        if asked.flagged:
            exchange.blocked, exchange.categories, exchange.checker = "instruction", asked.flagged_categories(), asked.checker
        else:
            yield from self._filtered_reply(exchange, settings)
        exchange.seconds = time.perf_counter() - started
        self.history.append(exchange)

    def _filtered_reply(self, exchange: Exchange, settings: DecodingSettings) -> Iterator[str]:
        shown_end = 0  # the reply up to here passed the filter and was yielded
        for exchange.reply in self._stream(exchange.instruction, exchange.input, settings):
            end = chunk_end(exchange.reply, shown_end)
            if end is None:
                continue
            if not self._passes(exchange, exchange.reply[:end].rstrip()):
                break
            shown_end = end
            yield exchange.reply[:end].rstrip()
        exchange.stopped_by_user = self.stop_event.is_set() and exchange.blocked is None
        if exchange.blocked is None and self._passes(exchange, exchange.reply) and len(exchange.reply) > shown_end:
            yield exchange.reply

    def _passes(self, exchange: Exchange, reply: str) -> bool:
        """Ask the filter about the reply so far; on a flag, mark the exchange blocked and end generation."""
        verdict = self.check(reply)
        exchange.checker = verdict.checker
        if verdict.flagged:
            exchange.blocked, exchange.categories = "reply", verdict.flagged_categories()
            self.stop_event.set()
        return not verdict.flagged

    def reply(self, instruction: str, input_text: str = "", settings: DecodingSettings = DecodingSettings()) -> Exchange:
        """Return the whole exchange at once (the static book, scripts and tests)."""
        for _ in self.respond(instruction, input_text, settings):
            pass
        return self.history[-1]

    def flag(self, index: int, reason: str) -> Path:
        """Append ``history[index]`` and the user's reason to the flags file (one whole line); return its path."""
        if not self.history:
            raise ValueError("Nothing to flag yet.")
        if not reason.strip():
            raise ValueError("Say what is wrong with the answer before flagging it.")
        exchange = self.history[index]
        append_records(self.flags_path, [{"time": time.time(), "reason": reason.strip(), **asdict(exchange)}])
        return self.flags_path

    def _stream(self, instruction: str, input_text: str, settings: DecodingSettings) -> Iterator[str]:
        if self.endpoint is not None:
            if self.endpoint.api != "chat" and settings.template == "chat":
                raise ValueError("a completions endpoint takes the Alpaca template; choose template='alpaca'")
            prompt = build_prompt(instruction, input_text, settings.template)  # chat: messages the server templates
            text = ""
            for piece in self.endpoint.stream(prompt, **settings.endpoint_kwargs()):
                if self.stop_event.is_set():
                    break
                text += piece
                yield text
            return
        yield from self._stream_model(build_prompt(instruction, input_text, settings.template, self.tokenizer),
                                      settings)

    def _stream_model(self, prompt: str, settings: DecodingSettings) -> Iterator[str]:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        tokenizer, model = self.tokenizer, self.model
        batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=settings.template == "alpaca").to(model.device)
        kwargs = {**batch, **settings.generate_kwargs(), "stopping_criteria": StoppingCriteriaList([_StopWhenSet(self.stop_event)]),
                  "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
        if settings.num_beams > 1:  # transformers streams one hypothesis only: a beam search answers whole
            import torch

            with torch.inference_mode():
                output = model.generate(**kwargs)
            yield tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            return
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        failure: list[BaseException] = []

        def run() -> None:
            import torch

            try:
                with torch.inference_mode():
                    model.generate(**kwargs, streamer=streamer)
            except BaseException as error:  # noqa: BLE001 - handed to the caller below, not swallowed
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text.strip()
        worker.join()
        if failure:
            raise failure[0]


@dataclass(frozen=True)
class ServedDemo:
    """What ``alpaca-nb demo`` serves: an in-process ``model`` (local path or Hugging Face id; None = the
    embedded SmolLM2), or, with ``base_url``, the model of that name at an OpenAI-compatible server."""

    model: str | None = None
    base_url: str | None = None
    flags_path: str = "flags.jsonl"

    def __post_init__(self) -> None:
        if self.base_url and not self.model:
            raise ValueError("with a base URL, name the model to ask there (--model)")

    def describe(self) -> str:
        if self.base_url:
            return f"{self.model} at {self.base_url} (no watermark: an external server)"
        return self.model or "the embedded SmolLM2-135M-Instruct (in process, on this machine)"

    def build(self, check: Callable[[str], Moderation] | None = None) -> ChatDemo:
        """Return the ``ChatDemo`` these settings describe, its model loaded once; ``check`` defaults to the
        profile's content filter. Each visitor gets ``for_new_visitor()`` of it."""
        from alpaca_nb.profiles import current_profile

        if check is None:
            from alpaca_nb.safety import profile_filter

            check = profile_filter(current_profile())
        if self.base_url:
            from alpaca_nb.llm import Endpoint

            return ChatDemo(endpoint=Endpoint(self.base_url, self.model), check=check, flags_path=self.flags_path)
        from alpaca_nb.models import load_model

        model, tokenizer = load_model(self.model, device=current_profile().device)
        return ChatDemo(model, tokenizer, check=check, flags_path=self.flags_path)


class VisitorLimits:
    """Each visitor's share of a served demo: one answer at a time, at most ``per_minute`` requests a minute,
    and replies of at most ``max_new_tokens`` tokens. Thread-safe: a server's handlers call it concurrently."""

    def __init__(self, per_minute: int = 6, max_new_tokens: int = 256, clock: Callable[[], float] = time.monotonic):
        if per_minute < 1 or max_new_tokens < 1:
            raise ValueError("per_minute and max_new_tokens must be at least 1")
        self.per_minute, self.max_new_tokens, self.clock = per_minute, max_new_tokens, clock
        self._started: dict[str, list[float]] = {}
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def admit(self, visitor: str, settings: DecodingSettings) -> str | None:
        """Return why ``visitor``'s request is refused now, or None after counting it as started (then
        ``finished`` must follow)."""
        if settings.max_new_tokens > self.max_new_tokens:
            return f"This demo answers with at most {self.max_new_tokens} tokens; lower max tokens."
        now = self.clock()
        with self._lock:
            if visitor in self._busy:
                return "Your previous question is still being answered; wait for it or press Stop."
            recent = [t for t in self._started.get(visitor, []) if now - t < 60]
            if len(recent) >= self.per_minute:
                return (f"You have asked {len(recent)} questions in the last minute, this demo's limit per visitor; "
                        f"try again in {60 - (now - recent[0]):.0f} s.")
            self._started[visitor] = [*recent, now]
            self._busy.add(visitor)
        return None

    def finished(self, visitor: str) -> None:
        with self._lock:
            self._busy.discard(visitor)

    def forget(self, visitor: str) -> None:
        """Drop what is kept about a visitor who left."""
        with self._lock:
            self._busy.discard(visitor)
            self._started.pop(visitor, None)
