"""The chat demo served to a class (``alpaca-nb demo``): one process, one model, many visitors, with Gradio.

The model is loaded once; every visitor gets a ``ChatDemo.for_new_visitor()`` of it (own history, own Stop)
and ``VisitorLimits`` on their requests. Gradio's queue runs at most ``concurrency`` answers at a time on the
shared model and shows the others their place in the queue; each page streams its own answer, which
``ChatDemo.respond`` releases only a filtered chunk at a time. The watermark is on by default wherever the
demo can apply it (the in-process model), and the page's detector checks any text against it. On any address
other than this machine's own, the page asks for a password (``access_password``). A visitor can only call
the page's own handlers: there is no code cell, no file upload and no open API.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import secrets
import threading
from dataclasses import dataclass
from typing import Iterator

import gradio as gr  # the `demo` extra; only `alpaca-nb demo` imports this module

from alpaca_nb.demo import MAX_INPUT_CHARS, MAX_INSTRUCTION_CHARS, ChatDemo, DecodingSettings, VisitorLimits, \
    history_html, reply_html, terms_of_use

__all__ = ["ClassSettings", "access_password", "build_app", "serve", "watermark_verdict"]

PASSWORD_ENV = "ALPACA_NB_DEMO_PASSWORD"
_CSS = ".alpaca-nb-demo-reply, .alpaca-nb-demo-history { white-space: normal; }"


@dataclass(frozen=True)
class ClassSettings:
    """How many answers the model works on at once, how many requests may wait, and each visitor's share."""

    concurrency: int = 4
    queue_size: int = 64
    per_minute: int = 6
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if min(self.concurrency, self.queue_size, self.per_minute, self.max_new_tokens) < 1:
            raise ValueError("concurrency, queue size, requests per minute and max tokens must be at least 1")


def access_password(host: str, given: str | None) -> tuple[str | None, bool]:
    """Return the password the page asks for (None: no sign-in) and whether it was generated here.

    Served on this machine's loopback address, the demo needs none unless one is given; on any other address
    it always asks for one, a random one if none is given, which the command prints for the instructor.
    """
    if given:
        return given, False
    if _loopback(host):
        return None, False
    return secrets.token_urlsafe(9), True


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Visitors:
    """One ``ChatDemo`` per browser session, all sharing the shared one's model; dropped when the page closes."""

    def __init__(self, shared: ChatDemo):
        self.shared, self._demos, self._lock = shared, {}, threading.Lock()

    def get(self, session: str) -> ChatDemo:
        with self._lock:
            if session not in self._demos:
                self._demos[session] = self.shared.for_new_visitor()
            return self._demos[session]

    def forget(self, session: str) -> None:
        """Drop a visitor who closed the page, ending the answer they were waiting for."""
        with self._lock:
            demo = self._demos.pop(session, None)
        if demo is not None:
            demo.stop()


def build_app(shared: ChatDemo, settings: ClassSettings = ClassSettings()) -> gr.Blocks:
    """Return the Gradio app that serves ``shared``'s model to many visitors (queued; call ``launch`` on it)."""
    visitors, limits = _Visitors(shared), VisitorLimits(settings.per_minute, settings.max_new_tokens)
    with gr.Blocks(title="Alpaca demo (alpaca-nb)", analytics_enabled=False) as app:
        gr.Markdown(f"## Alpaca's demo, rebuilt\n**Terms of use.** {terms_of_use(shared.can_watermark)}")
        instruction = gr.Textbox(label="instruction", lines=3, max_length=MAX_INSTRUCTION_CHARS,
                                 elem_classes="alpaca-nb-demo-instruction")
        input_text = gr.Textbox(label="input (optional)", lines=2, max_length=MAX_INPUT_CHARS)
        with gr.Accordion("decoding", open=False):
            template = gr.Dropdown([("Alpaca template", "alpaca"), ("the model's chat template", "chat")],
                                   value="alpaca", label="template")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.1, label="temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
            top_k = gr.Slider(0, 100, value=0, step=1, label="top-k (0 off)")
            beams = gr.Slider(1, 4, value=1, step=1, label="beams")
            max_tokens = gr.Slider(8, settings.max_new_tokens, value=min(128, settings.max_new_tokens), step=8,
                                   label="max tokens")
            watermark = gr.Checkbox(value=shared.can_watermark, interactive=shared.can_watermark,
                                    label="watermark" if shared.can_watermark else
                                    "watermark: not available, the answers come from an external server")
        with gr.Row():
            generate = gr.Button("Generate", variant="primary", elem_classes="alpaca-nb-demo-generate")
            stop = gr.Button("Stop")
        status = gr.HTML(elem_classes="alpaca-nb-demo-status")
        reply = gr.HTML(elem_classes="alpaca-nb-demo-reply", min_height=40)
        history = gr.HTML(elem_classes="alpaca-nb-demo-history")
        with gr.Row():
            reason = gr.Textbox(label="what is wrong with the last answer?", scale=4,
                                elem_classes="alpaca-nb-demo-reason")
            flag = gr.Button("Flag this answer", variant="secondary", scale=1)
        if shared.can_watermark:
            with gr.Accordion("Check a text for the watermark", open=False):
                suspect = gr.Textbox(label="text (an answer of this demo, or anyone's)", lines=4,
                                     elem_classes="alpaca-nb-demo-suspect")
                check = gr.Button("Check")
                verdict = gr.HTML(elem_classes="alpaca-nb-demo-watermark")
            check.click(lambda text: watermark_verdict(shared, text), suspect, verdict, concurrency_limit=None,
                        api_visibility="private")

        def answer(instruction: str, input_text: str, template: str, temperature: float, top_p: float, top_k: float,
                   beams: float, max_tokens: float, watermark: bool, request: gr.Request) -> Iterator[tuple[str, str, str]]:
            demo = visitors.get(request.session_hash)
            try:
                decoding = DecodingSettings(template, temperature, top_p, int(top_k), int(beams), int(max_tokens),
                                            watermark)  # respond() records it off where it cannot apply
            except ValueError as error:
                yield _message(str(error)), "", history_html(demo.history)
                return
            refusal = limits.admit(request.session_hash, decoding)
            if refusal:
                yield _message(refusal), "", history_html(demo.history)
                return
            try:
                yield _message("answering…"), "", history_html(demo.history)
                for text in demo.respond(instruction, input_text, decoding):
                    yield _message("answering…"), reply_html(text), history_html(demo.history)
                yield "", "", history_html(demo.history)
            except ValueError as error:  # a refused length or template: the message says what to change
                yield _message(str(error)), "", history_html(demo.history)
            finally:
                limits.finished(request.session_hash)

        def stop_answer(request: gr.Request) -> None:
            visitors.get(request.session_hash).stop()

        def flag_answer(reason: str, request: gr.Request) -> tuple[str, str]:
            try:
                visitors.get(request.session_hash).flag(-1, reason)
            except ValueError as error:
                return _message(str(error)), reason
            return _message("Flagged; thank you. The instructor will read it."), ""

        def leave(request: gr.Request) -> None:
            visitors.forget(request.session_hash)
            limits.forget(request.session_hash)

        controls = [instruction, input_text, template, temperature, top_p, top_k, beams, max_tokens, watermark]
        generate.click(answer, controls, [status, reply, history], show_progress="full", show_progress_on=[reply],
                       api_visibility="private")
        stop.click(stop_answer, None, None, concurrency_limit=None, api_visibility="private")
        flag.click(flag_answer, reason, [status, reason], concurrency_limit=None, api_visibility="private")
        app.unload(leave)
    return app.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency, api_open=False)


def watermark_verdict(shared: ChatDemo, text: str) -> str:
    """Return what the page's watermark check says about ``text``: the detector at the served model's settings."""
    from alpaca_nb.safety import detect_watermark

    try:
        result = detect_watermark(text, shared.tokenizer, shared.model.config, shared.model.device)
    except ValueError as error:
        return _message(str(error))
    answer = "watermarked (z > 4): machine-written by this demo's model" if result.watermarked else "no watermark found"
    return _message(f"{answer}: z = {result.z_score:.1f}, p = {result.p_value:.2g}, "
                    f"{result.tokens_scored} tokens scored, {result.green_fraction:.0%} of them green")


def _message(text: str) -> str:
    return f"<p>{html.escape(text)}</p>" if text else ""


def serve(shared: ChatDemo, host: str, port: int, password: str | None, settings: ClassSettings = ClassSettings()
          ) -> gr.Blocks:
    """Start serving ``shared`` in this process's threads and return the app (``app.close()`` stops it)."""
    shared.warm_up()
    app = build_app(shared, settings)
    auth = None if password is None else (lambda _name, given: hmac.compare_digest(given, password))
    app.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=True, quiet=True, ssr_mode=False,
               mcp_server=False, footer_links=[], auth_message="Sign in with any name and the demo's password.",
               css=_CSS, show_error=False)
    return app
