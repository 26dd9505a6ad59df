"""alpaca_nb.demo: every control reaches generate, streaming, Stop, the filter both ways, flags, endpoints.

The in-process tests run the embedded SmolLM2-135M-Instruct; the endpoint tests stream from the real
embedded llama-server.
"""

from __future__ import annotations

import html
import json
import re
import time

import pytest
import torch

from alpaca_nb.demo import CHUNK_WORDS, ChatDemo, DecodingSettings, VisitorLimits, build_prompt, chunk_end, \
    exchange_html, length_problem, terms_of_use
from alpaca_nb.safety import Moderation, detect_watermark

INSTRUCTION = "Give three tips for staying healthy."


@pytest.fixture(scope="module")
def embedded():
    from alpaca_nb.models import load_model

    return load_model()


@pytest.fixture
def demo(embedded, tmp_path):
    model, tokenizer = embedded
    return ChatDemo(model, tokenizer, flags_path=tmp_path / "flags.jsonl")


def reply(demo, seed=0, **settings):
    torch.manual_seed(seed)
    return demo.reply(INSTRUCTION, "", DecodingSettings(**{"max_new_tokens": 24, "watermark": False, **settings})).reply


def test_settings_become_explicit_generate_arguments():
    greedy = DecodingSettings(watermark=False).generate_kwargs()
    assert greedy["do_sample"] is False and greedy["temperature"] is None and "watermarking_config" not in greedy
    sampled = DecodingSettings(temperature=0.7, top_p=0.9, top_k=40, num_beams=2, max_new_tokens=9).generate_kwargs()
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (True, 0.7, 0.9, 40)
    assert sampled["num_beams"] == 2 and sampled["max_new_tokens"] == 9
    config = sampled["watermarking_config"]
    assert (config.greenlist_ratio, config.bias, config.seeding_scheme) == (0.25, 2.0 / 0.7, "lefthash")
    with pytest.raises(ValueError, match="template="):
        DecodingSettings(template="vicuna")
    with pytest.raises(ValueError, match="top_p"):
        DecodingSettings(top_p=0)


def test_temperature_zero_is_greedy_and_above_zero_samples(demo):
    assert reply(demo, seed=1) == reply(demo, seed=2)  # greedy: the seed changes nothing
    sampled = {reply(demo, seed=seed, temperature=1.5) for seed in (1, 2, 3)}
    assert len(sampled) > 1 and reply(demo, seed=1, temperature=1.5) == reply(demo, seed=1, temperature=1.5)


def test_top_k_and_top_p_reach_the_sampler(demo):
    greedy = reply(demo)
    # One candidate left, by either control: sampling at any temperature gives the greedy text.
    assert reply(demo, seed=5, temperature=1.5, top_k=1) == greedy
    assert reply(demo, seed=5, temperature=1.5, top_p=0.001) == greedy


def test_beams_search_and_max_new_tokens_caps_the_reply(demo, embedded, monkeypatch):
    model, tokenizer = embedded
    seen = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **kwargs: seen.append(kwargs) or original(**kwargs))
    searched = reply(demo, num_beams=3)
    assert seen[-1]["num_beams"] == 3 and "streamer" not in seen[-1] and searched.strip()
    short = reply(demo, max_new_tokens=5)
    assert seen[-1]["max_new_tokens"] == 5 and len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= 6


def test_the_watermark_switch_marks_the_reply(demo, embedded):
    model, tokenizer = embedded
    z = {}
    for marked in (True, False):
        text = reply(demo, seed=3, temperature=1.0, max_new_tokens=64, watermark=marked)
        z[marked] = detect_watermark(text, tokenizer, model.config).z_score
    assert z[True] - z[False] > 3 and z[False] < 4, z  # a reply of up to 64 tokens: the switch moves z by ~5


def test_respond_streams_a_growing_reply_and_keeps_the_exchange(demo):
    pieces = list(demo.respond(INSTRUCTION, "", DecodingSettings(max_new_tokens=64, watermark=False)))
    assert len(pieces) >= 3 and all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))
    exchange = demo.history[-1]
    assert exchange.reply == pieces[-1] and exchange.blocked is None and exchange.checker.startswith("offline:")


def test_stop_ends_the_reply_early(demo):
    stream = demo.respond(INSTRUCTION, "", DecodingSettings(max_new_tokens=200, watermark=False))
    first = next(stream)
    demo.stop()
    rest = list(stream)
    exchange = demo.history[-1]
    assert exchange.stopped_by_user and len(rest) < 20 and exchange.reply.startswith(first)


def test_the_filter_blocks_a_harmful_instruction_before_generating(demo):
    assert list(demo.respond("I am going to kill you tomorrow.")) == []
    exchange = demo.history[-1]
    assert exchange.blocked == "instruction" and "violence" in exchange.categories and exchange.reply == ""


def test_the_filter_blocks_a_harmful_reply(embedded, tmp_path):
    model, tokenizer = embedded

    def flags_replies(text):  # a filter that passes the instruction and flags whatever the model says
        flagged = text != INSTRUCTION
        return Moderation(flagged, {"test": flagged}, {"test": float(flagged)}, "stub:test")

    demo = ChatDemo(model, tokenizer, check=flags_replies, flags_path=tmp_path / "flags.jsonl")
    exchange = demo.reply(INSTRUCTION, "", DecodingSettings(max_new_tokens=8, watermark=False))
    assert exchange.blocked == "reply" and exchange.categories == ["test"]


def test_lengths_are_checked_with_a_message_that_says_the_limit(demo):
    assert length_problem("fine") is None
    assert "Type an instruction" in length_problem("   ")
    with pytest.raises(ValueError, match="at most 1,000"):
        list(demo.respond("x" * 1001))
    with pytest.raises(ValueError, match="input has 2,001 characters"):
        list(demo.respond("Summarise this.", "y" * 2001))


def test_flag_appends_the_exchange_and_reason_as_one_line(demo, tmp_path):
    demo.reply(INSTRUCTION, "", DecodingSettings(max_new_tokens=8, watermark=False))
    with pytest.raises(ValueError, match="Say what is wrong"):
        demo.flag(-1, "  ")
    path = demo.flag(-1, "it gives medical advice")
    demo.flag(-1, "second report")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["reason"] for row in rows] == ["it gives medical advice", "second report"]
    assert rows[0]["instruction"] == INSTRUCTION and rows[0]["settings"]["max_new_tokens"] == 8


def test_prompts_follow_the_template(embedded):
    _, tokenizer = embedded
    assert build_prompt("Name a colour.", "", "alpaca").endswith("### Response:")
    assert build_prompt("Name a colour.", "Be brief.", "chat") == [
        {"role": "user", "content": "Name a colour.\n\nBe brief."}]
    assert "<|im_start|>assistant" in build_prompt("Name a colour.", "", "chat", tokenizer)


@pytest.mark.parametrize("api, template", [("chat", "chat"), ("completions", "alpaca")])
def test_an_endpoint_streams_the_reply(llama_server, tmp_path, api, template):
    from alpaca_nb.llm import Endpoint

    endpoint = Endpoint(llama_server.base_url, llama_server.model, api=api, timeout=120)
    demo = ChatDemo(endpoint=endpoint, flags_path=tmp_path / "flags.jsonl")
    pieces = list(demo.respond(INSTRUCTION, "", DecodingSettings(template=template, max_new_tokens=24)))
    assert len(pieces) > 3 and all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))
    assert demo.history[-1].reply == pieces[-1]
    if api == "completions":
        with pytest.raises(ValueError, match="Alpaca template"):
            list(demo.respond(INSTRUCTION, "", DecodingSettings(template="chat")))


def test_chat_demo_widget_generates_in_a_thread_shows_history_and_flags(demo):
    from alpaca_nb.widgets import chat_demo_widget

    widget = chat_demo_widget(demo, INSTRUCTION)
    terms, instruction, _input, controls, buttons, status, _reply, history, flag_row = widget.children
    assert "Terms of use" in terms.value and instruction.value == INSTRUCTION and history.value == ""
    controls.children[5].value = 16  # max tokens
    controls.children[6].value = False  # watermark
    generate = buttons.children[0]
    generate.click()
    deadline = time.monotonic() + 120
    while not demo.history and time.monotonic() < deadline:
        time.sleep(0.2)
    while generate.disabled and time.monotonic() < deadline:
        time.sleep(0.1)
    assert demo.history and html.escape(demo.history[-1].reply) in history.value
    reason, flag = flag_row.children
    reason.value = "too vague"
    flag.click()
    assert "Flagged" in status.value and demo.flags_path.is_file()


def test_served_demo_loads_once_and_each_visitor_shares_it_without_a_false_watermark(llama_server, tmp_path):
    from alpaca_nb.demo import ServedDemo, terms_of_use

    served = ServedDemo(llama_server.model, llama_server.base_url, str(tmp_path / "flags.jsonl"))
    assert llama_server.base_url in served.describe() and "no watermark" in served.describe()
    shared = served.build(check=lambda text: Moderation(False, {}, {}, "none"))
    first, second = shared.for_new_visitor(), shared.for_new_visitor()
    assert first.endpoint is shared.endpoint is second.endpoint and first.history is not second.history
    assert not shared.can_watermark and "NO watermark" in terms_of_use(shared.can_watermark)
    exchange = first.reply(INSTRUCTION, "", DecodingSettings(template="chat", max_new_tokens=8, watermark=True))
    assert exchange.reply and exchange.settings["watermark"] is False  # an external server's answer is not marked
    assert second.history == [] and "no watermark" in exchange_html(exchange)
    with pytest.raises(ValueError, match="name the model"):
        ServedDemo(base_url=llama_server.base_url)


def test_each_visitor_of_the_in_process_model_gets_a_watermarked_answer(embedded, tmp_path):
    model, tokenizer = embedded
    shared = ChatDemo(model, tokenizer, flags_path=tmp_path / "flags.jsonl")
    visitor = shared.for_new_visitor()
    assert visitor.model is model and visitor.can_watermark and "carry a watermark" in terms_of_use(True)
    torch.manual_seed(0)
    exchange = visitor.reply("Write a short story about a lighthouse keeper.", "",
                             DecodingSettings(temperature=0.7, max_new_tokens=120))
    assert exchange.settings["watermark"] is True and shared.history == []
    assert detect_watermark(exchange.reply, tokenizer, model.config, model.device).z_score > 2
    from alpaca_nb.demo_server import watermark_verdict  # what the served page's check says about it

    z_served = float(re.search(r"z = (-?[\d.]+)", watermark_verdict(shared, exchange.reply)).group(1))
    assert abs(z_served - detect_watermark(exchange.reply, tokenizer, model.config, model.device).z_score) < 0.06
    assert "no watermark found" in watermark_verdict(shared, "The weather was mild and the harbour quiet all week.")
    assert "at least 2" in watermark_verdict(shared, "Hi")


def test_chunks_end_at_sentences_lines_or_after_a_few_words():
    assert chunk_end("Hello there") is None  # the last word may still grow
    assert chunk_end("Hello there. And") == len("Hello there. ")
    assert chunk_end("One\ntwo") == len("One\n")
    words = " ".join(["word"] * CHUNK_WORDS) + " "
    assert chunk_end(words + "more") == len(words)
    assert chunk_end("Hi. Then more. Tail", 4) == len("Hi. Then more. ")  # only after where it starts
    assert chunk_end("Pi is 3.14 and", 0) is None


class StandInEndpoint:
    """A model stand-in for the filter-ordering tests: streams ``text`` a word at a time and counts the pieces
    it was asked for, so a test sees when generation stopped."""

    api = "chat"

    def __init__(self, text: str, delay_s: float = 0.0):
        self.text, self.delay_s, self.pieces_sent = text, delay_s, 0

    def stream(self, prompt, **kwargs):
        for piece in re.findall(r"\S+\s*", self.text):
            time.sleep(self.delay_s)
            self.pieces_sent += 1
            yield piece


def flags_forbidden(text: str) -> Moderation:
    """A filter that flags any text containing FORBIDDEN, and records what it was asked."""
    flags_forbidden.asked.append(text)
    flagged = "FORBIDDEN" in text
    return Moderation(flagged, {"test": flagged}, {"test": float(flagged)}, "stand-in")


MID_STREAM = ("Here is a calm first sentence. A second line follows it.\nThen comes the FORBIDDEN part of it. "
              "And more text that should never be generated or shown at all.")


def test_no_reply_text_reaches_the_caller_before_the_filter_passed_it(tmp_path):
    flags_forbidden.asked = []
    endpoint = StandInEndpoint(MID_STREAM)
    demo = ChatDemo(endpoint=endpoint, check=flags_forbidden, flags_path=tmp_path / "flags.jsonl")
    shown = list(demo.respond("Tell me something."))
    assert shown == ["Here is a calm first sentence.", "Here is a calm first sentence. A second line follows it."]
    assert all(text in flags_forbidden.asked for text in shown)  # each was asked about before it was yielded
    exchange = demo.history[-1]
    assert exchange.blocked == "reply" and not exchange.stopped_by_user and "FORBIDDEN" in exchange.reply
    assert endpoint.pieces_sent == len(re.findall(r"\S+\s*", MID_STREAM.split("And more")[0]))  # ended with its chunk
    assert "FORBIDDEN" not in exchange_html(exchange) and "blocked" in exchange_html(exchange)


def test_the_end_of_a_reply_is_filtered_whole_before_it_is_shown(tmp_path):
    flags_forbidden.asked = []
    demo = ChatDemo(endpoint=StandInEndpoint("A calm start. Ends FORBIDDEN"), check=flags_forbidden,
                    flags_path=tmp_path / "flags.jsonl")
    assert list(demo.respond("Tell me something.")) == ["A calm start."]
    assert demo.history[-1].blocked == "reply"
    passing = ChatDemo(endpoint=StandInEndpoint("A calm start. Ends well"), check=flags_forbidden,
                       flags_path=tmp_path / "flags.jsonl")
    assert list(passing.respond("Tell me something.")) == ["A calm start.", "A calm start. Ends well"]


def test_visitor_limits_allow_one_answer_at_a_time_and_a_few_a_minute():
    now = [0.0]
    limits = VisitorLimits(per_minute=2, max_new_tokens=64, clock=lambda: now[0])
    settings = DecodingSettings(max_new_tokens=32)
    assert limits.admit("a", settings) is None
    assert "still being answered" in limits.admit("a", settings)
    assert limits.admit("b", settings) is None  # another visitor is not held up by a's
    limits.finished("a")
    assert limits.admit("a", settings) is None
    limits.finished("a")
    now[0] = 30.0
    assert "2 questions in the last minute" in limits.admit("a", settings) and "30 s" in limits.admit("a", settings)
    now[0] = 61.0
    assert limits.admit("a", settings) is None
    assert "at most 64 tokens" in limits.admit("c", DecodingSettings(max_new_tokens=128))
    limits.forget("a")
    assert limits.admit("a", settings) is None


FLAG_WRITER = """
import sys
from alpaca_nb.demo import ChatDemo, Exchange
class Unused:
    api = "chat"
demo = ChatDemo(endpoint=Unused(), flags_path=sys.argv[1])
demo.history.append(Exchange("process " + sys.argv[2], "", "y" * 50_000, {}))
for i in range(int(sys.argv[3])):
    demo.flag(-1, f"{sys.argv[2]}:{i}")
"""


def test_flags_from_many_visitors_at_once_append_whole_lines(tmp_path):
    """Threads of one served process and two other processes flag into one file at once; 50 KB lines make an
    interleaving likely if a write were split. Every flag is one whole JSON line, none lost."""
    import subprocess
    import sys
    import threading

    from alpaca_nb.demo import Exchange

    path, per_writer = tmp_path / "flags.jsonl", 25
    shared = ChatDemo(endpoint=StandInEndpoint(""), flags_path=path)

    def visitor(name: str) -> None:
        demo = shared.for_new_visitor()
        demo.history.append(Exchange(f"visitor {name}", "", "x" * 50_000, {}))
        for i in range(per_writer):
            demo.flag(-1, f"{name}:{i}")

    processes = [subprocess.Popen([sys.executable, "-c", FLAG_WRITER, str(path), f"p{n}", str(per_writer)])
                 for n in range(2)]
    threads = [threading.Thread(target=visitor, args=(f"t{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [process.wait(timeout=120) for process in processes] == [0, 0]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    reasons = sorted(json.loads(line)["reason"] for line in lines[:-1])
    expected = sorted(f"{w}:{i}" for w in [*(f"t{n}" for n in range(6)), "p0", "p1"] for i in range(per_writer))
    assert reasons == expected


def test_the_demo_command_refuses_a_base_url_without_a_model(capsys):
    from alpaca_nb.cli import main

    assert main(["demo", "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "name the model" in capsys.readouterr().err
