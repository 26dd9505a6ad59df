"""The chat demo of chapter 6: Alpaca's web demo, with its content filter and its watermark.

``ChatDemo.respond`` checks the lengths, asks the content filter about the instruction, streams the reply
(the in-process model through transformers' ``TextIteratorStreamer`` in a worker thread, or any
``Endpoint`` with ``stream=True``), asks the filter about the reply, and keeps the exchange in the
history. ``ChatDemo.flag`` appends an exchange and the user's reason to a flags JSONL file, as the release
asked its users to report concerning answers. ``widgets.chat_demo_widget`` is the view.
``ServedDemo`` is what ``alpaca-nb demo`` serves as a web page with Voila (``demo_app.ipynb``).

Unlike alpaca-lora's ``generate.py``, whose temperature and top-p sliders changed nothing because it never set
``do_sample``, every control here reaches ``generate``: temperature 0 is greedy decoding, above 0 samples,
more than one beam searches.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from alpaca_nb.evaluate import instruction_text
from alpaca_nb.jsonl import append_records
from alpaca_nb.safety import Moderation, moderate, watermarking_config
from alpaca_nb.sft import format_prompt

__all__ = ["APP_NOTEBOOK", "TERMS_OF_USE", "ChatDemo", "DecodingSettings", "Exchange", "ServedDemo", "build_prompt",
           "length_problem"]

TEMPLATES = ("alpaca", "chat")
APP_NOTEBOOK = Path(__file__).with_name("demo_app.ipynb")  # the page `alpaca-nb demo` serves with Voila
SERVED_DEMO_ENV = "ALPACA_NB_DEMO"  # how `alpaca-nb demo` tells Voila's kernel what to serve (kernels inherit it)
MAX_INSTRUCTION_CHARS = 1000
MAX_INPUT_CHARS = 2000
TERMS_OF_USE = (
    "This demo is for research and teaching only, not for commercial use: Alpaca's data (CC BY-NC 4.0) and "
    "LLaMA's licence forbid it. Answers can be wrong, biased or offensive. Every exchange passes a content "
    "filter, and answers carry a watermark that marks them as machine-written. Flag a concerning answer "
    "with the button below it."
)


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

    def stop(self) -> None:
        """Ask the reply being generated to end now (the Stop button)."""
        self.stop_event.set()

    def respond(self, instruction: str, input_text: str = "", settings: DecodingSettings = DecodingSettings()
                ) -> Iterator[str]:
        """Yield the reply so far, growing, then keep the exchange in ``history`` (its last entry).

        A refused length raises ValueError with the message to show. A filtered instruction yields nothing
        and is kept as blocked; a filtered reply is kept as blocked, and the view hides it.
        """
        problem = length_problem(instruction, input_text)
        if problem:
            raise ValueError(problem)
        self.stop_event.clear()
        started = time.perf_counter()
        exchange = Exchange(instruction, input_text, "", asdict(settings))
        asked = self.check(instruction_text(instruction, input_text))
        if asked.flagged:
            exchange.blocked, exchange.categories, exchange.checker = "instruction", asked.flagged_categories(), asked.checker
        else:
            for exchange.reply in self._stream(instruction, input_text, settings):
                yield exchange.reply
            answered = self.check(exchange.reply)
            exchange.checker = answered.checker
            if answered.flagged:
                exchange.blocked, exchange.categories = "reply", answered.flagged_categories()
        exchange.stopped_by_user = self.stop_event.is_set()
        exchange.seconds = time.perf_counter() - started
        self.history.append(exchange)

    def reply(self, instruction: str, input_text: str = "", settings: DecodingSettings = DecodingSettings()) -> Exchange:
        """Return the whole exchange at once (the static book, scripts and tests)."""
        for _ in self.respond(instruction, input_text, settings):
            pass
        return self.history[-1]

    def flag(self, index: int, reason: str) -> Path:
        """Append ``history[index]`` and the user's reason to the flags file (one whole line); return its path."""
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

    def environment(self) -> dict[str, str]:
        """Return the environment variable that hands these settings to the served notebook's kernel."""
        return {SERVED_DEMO_ENV: json.dumps(asdict(self))}

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> ServedDemo:
        """Return the settings ``alpaca-nb demo`` set, or the defaults when the notebook runs on its own."""
        value = (os.environ if environ is None else environ).get(SERVED_DEMO_ENV)
        return cls(**json.loads(value)) if value else cls()

    def describe(self) -> str:
        if self.base_url:
            return f"{self.model} at {self.base_url}"
        return self.model or "the embedded SmolLM2-135M-Instruct (in process, on this machine)"

    def build(self, check: Callable[[str], Moderation] | None = None) -> ChatDemo:
        """Return the ``ChatDemo`` these settings describe; ``check`` defaults to the profile's content filter."""
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
