"""alpaca_nb.selfinstruct: prompt layout, parsing and filters on hand-written cases and the real prompt."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpaca_nb.data import SeedTask, load_prompt_template, load_seed_tasks
from alpaca_nb.selfinstruct import (
    BLACKLIST,
    FormatConstraint,
    SamplingSettings,
    encode_chat_prompt,
    encode_completion,
    encode_prompt,
    filter_reason,
    format_constraint,
    parse_completion,
)


def seed(instruction: str, task_input: str = "", output: str = "out") -> SeedTask:
    return SeedTask("s", "n", instruction, task_input, output, False)


def test_encode_prompt_matches_the_upstream_layout():
    prompt = encode_prompt([seed("Say  hi\nnow:"), seed("Add.", "1 + 1", "2")], template="HEADER")
    assert prompt == (
        "HEADER\n###\n"
        "1. Instruction: Say hi now\n1. Input:\n<noinput>\n1. Output:\nout\n###\n"
        "2. Instruction: Add.\n2. Input:\n1 + 1\n2. Output:\n2\n###\n"
        "3. Instruction:"
    )


def test_encode_prompt_uses_upstream_prompt_txt_by_default():
    seeds = load_seed_tasks()[:3]
    prompt = encode_prompt(seeds)
    assert prompt.startswith(load_prompt_template() + "\n###\n1. Instruction: ")
    assert prompt.endswith("###\n4. Instruction:")
    assert prompt.count("###") == 4


def test_chat_variant_carries_the_same_prompt():
    seeds = load_seed_tasks()[:3]
    messages = encode_chat_prompt(seeds)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == encode_prompt(seeds)


def test_sampling_defaults_are_upstreams():
    settings_ = SamplingSettings()
    assert (settings_.num_prompt_instructions, settings_.temperature, settings_.top_p, settings_.max_tokens) == (3, 1.0, 1.0, 3072)
    assert settings_.stop == ("\n20", "20.")


COMPLETION = (
    " Summarize the article in two sentences.\n4. Input:\nThe cat sat on the mat all day long.\n4. Output:\nA cat sat.\n###\n"
    "5. Instruction: List three fruits that are red.\n5. Input:\n<noinput>\n5. Output:\nApple, cherry, strawberry.\n###\n"
    "6. Instruction: A block without the other fields\n###\n"
    "7. Instruction: Translate to French.\n7. Input:\nHello\n7. Output:\nBonj"
)


def test_parse_splits_blocks_and_maps_noinput_to_empty():
    parsed = parse_completion(COMPLETION)
    assert [c.instruction for c in parsed] == ["Summarize the article in two sentences.", "List three fruits that are red.",
                                               "Translate to French."]
    assert parsed[1].input == "" and parsed[0].input == "The cat sat on the mat all day long."
    assert parsed.malformed == 1 and parsed.truncated == 0


def test_parse_drops_truncated_last_block():
    parsed = parse_completion(COMPLETION, truncated=True)
    assert [c.instruction for c in parsed][-1] == "List three fruits that are red."
    assert parsed.truncated == 1


def test_parse_tolerates_a_repeated_header_from_chat_models():
    parsed = parse_completion("4. Instruction: Name a color.\n4. Input:\n<noinput>\n4. Output:\nRed")
    assert parsed == [("Name a color.", "", "Red")]


def test_parse_requires_consecutive_numbering():
    parsed = parse_completion(" A.\n4. Input:\nx\n4. Output:\ny\n###\n9. Instruction: B.\n9. Input:\nx\n9. Output:\ny")
    assert len(parsed) == 1 and parsed.malformed == 1


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=400), st.integers(0, 25), st.booleans())
def test_parse_never_raises(text, num_prompt, truncated):
    parsed = parse_completion(text, num_prompt, truncated)
    assert parsed.malformed >= 0 and all(len(candidate) == 3 for candidate in parsed)


@pytest.mark.parametrize(
    ("instruction", "reason"),
    [
        ("Too short now", "too_short"),
        ("", "too_short"),
        ("word " * 151, "too_long"),
        ("Draw a picture of a cat please.", "blacklisted_word"),
        ("Please go to the store for milk.", "blacklisted_word"),
        ("Summarize the FILES in this folder.", "blacklisted_word"),
        ("Write a program that sums two numbers.", "write_a_program"),
        ("\"Quote\" this sentence for me now.", "starts_with_punctuation"),
        ("Éditez ce texte pour moi maintenant.", "starts_non_ascii"),
        ("Explain the mapping between these two sets.", None),  # 'map' only as a whole word
        ("Write a poem about the autumn sea.", None),
        ("word " * 150, None),
    ],
)
def test_filter_reason_follows_upstream_rules(instruction, reason):
    assert filter_reason(instruction) == reason


def test_blacklist_is_upstreams():
    assert len(BLACKLIST) == 18 and "go to" in BLACKLIST and "flowchart" in BLACKLIST


def test_price_prompt_counts_p50k_tokens_and_prices_at_davinci_rates():
    import tiktoken

    from alpaca_nb.selfinstruct import price_prompt

    seeds = load_seed_tasks()[:3]
    priced = price_prompt(seeds)
    assert priced.prompt == encode_prompt(seeds)
    assert priced.prompt_tokens == len(tiktoken.get_encoding("p50k_base").encode(priced.prompt))
    assert priced.prompt_usd == pytest.approx(priced.prompt_tokens * 0.02 / 1000)
    assert priced.worst_case_usd == pytest.approx((priced.prompt_tokens + 3072) * 0.02 / 1000)


def test_max_similarities_against_the_seeds():
    from alpaca_nb.selfinstruct import max_similarities

    seeds = [task.instruction for task in load_seed_tasks()]
    assert max_similarities([seeds[0], "zzz qqq"], seeds) == [1.0, 0.0]


def test_plots_draw_the_funnel_and_histograms():
    import matplotlib

    matplotlib.use("Agg")
    from collections import Counter
    from pathlib import Path

    from alpaca_nb.selfinstruct import GenerationReport, plot_funnel, plot_similarity_histograms

    report = GenerationReport(Path("."), kept=2, counters=Counter(blocks=10, malformed=5, too_short=2, near_duplicate=1))
    assert report.funnel() == {"generated blocks": 10, "parsed": 5, "passed filters": 3, "kept (not near-duplicates)": 2}
    assert len(plot_funnel(report).axes) == 2
    figure = plot_similarity_histograms({"ours": [], "theirs": [0.1, 0.5]})
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()][:2] == ["ours (n=0)", "theirs (n=2)"]


def test_keep_rate_is_kept_over_generated_blocks_and_zero_before_any_block():
    from collections import Counter
    from pathlib import Path

    from alpaca_nb.selfinstruct import GenerationReport

    assert GenerationReport(Path("."), kept=2, counters=Counter(blocks=10, malformed=5)).keep_rate == 0.2
    assert GenerationReport(Path(".")).keep_rate == 0.0


def test_cluster_teacher_is_the_named_remote_chat_endpoint():
    from alpaca_nb.profiles import load_profile
    from alpaca_nb.selfinstruct import teacher_endpoint

    with teacher_endpoint(load_profile("cluster")) as teacher:
        assert (teacher.base_url, teacher.model, teacher.api) == ("https://api.openai.com/v1", "gpt-4o-mini", "chat")


def test_encode_completion_continues_after_the_prompts_last_header():
    from alpaca_nb.selfinstruct import encode_completion

    text = encode_completion([seed("Add.", "1 + 1", "2"), seed("Name a color.")])
    assert text == " Add.\n4. Input:\n1 + 1\n4. Output:\n2\n###\n5. Instruction: Name a color.\n5. Input:\n<noinput>\n5. Output:\nout\n"
    assert parse_completion(text) == [("Add.", "1 + 1", "2"), ("Name a color.", "", "out")]


def test_request_tokens_are_means_over_real_texts():
    from alpaca_nb.data import load_alpaca_data
    from alpaca_nb.selfinstruct import request_tokens

    tokens = request_tokens(load_seed_tasks(), load_alpaca_data(asset="alpaca_sample"), samples=5)
    assert tokens.tasks_per_completion == 16
    assert 500 < tokens.prompt_tokens < 1500 and 500 < tokens.completion_tokens < 4000


# -- format constraints ----------------------------------------------------------------------------


def grammar_as_regex(grammar: str) -> re.Pattern:
    """Translate the constraint's small GBNF (literals, rule names, one character class) into a regex."""
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines() if line)

    def expand(body: str) -> str:
        parts = []
        for literal, char_class, repeat, name in re.findall(r'("(?:[^"\\]|\\.)*")|(\[[^\]]*\])(\{\d+,\d+\})?|(\w+)', body):
            if literal:
                parts.append(re.escape(json.loads(literal)))
            elif char_class:
                parts.append(char_class.replace("\\\\n", "\\n") + (repeat or ""))
            else:
                parts.append(f"(?:{expand(rules[name])})")
        return "".join(parts)

    return re.compile(expand(rules["root"]))


def test_the_grammar_accepts_exactly_the_block_layout_that_encode_completion_writes():
    fields = lambda task: (task.instruction, task.input or "<noinput>", task.output)  # noqa: E731
    one_line = [task for task in load_seed_tasks()
                if all("\n" not in field and "#" not in field and len(field) <= 300 for field in fields(task))][:3]
    assert len(one_line) == 3
    written = encode_completion(one_line, first_number=4)  # blocks 4, 5, 6 as a teacher would write them
    pattern = grammar_as_regex(FormatConstraint("grammar", first_number=4, blocks=3).grammar())
    assert pattern.fullmatch(written.rstrip("\n") + "\n")
    assert not pattern.fullmatch(written.replace("5. Input:", "5. Inputs:"))
    assert not pattern.fullmatch(encode_completion(one_line, first_number=5))  # numbering must follow the prompt
    assert len(parse_completion(written, 3)) == 3


def test_json_tasks_become_block_text_that_parses_back():
    constraint = FormatConstraint("json_schema", first_number=4, blocks=2)
    reply = json.dumps({"tasks": [{"instruction": "Name three primary colours.", "input": "", "output": "Red, yellow, blue."},
                                  {"instruction": "Sum the numbers.", "input": "2, 3", "output": "5"}]})
    parsed = parse_completion(constraint.completion_text(reply), 3)
    assert list(parsed) == [("Name three primary colours.", "", "Red, yellow, blue."), ("Sum the numbers.", "2, 3", "5")]
    assert parse_completion(constraint.completion_text('{"tasks": [{"instruction"'), 3).malformed == 1
    schema = constraint.request_args()["response_format"]["json_schema"]["schema"]["properties"]["tasks"]
    assert (schema["minItems"], schema["maxItems"]) == (2, 2)


def test_format_names_are_checked_and_upstream_means_no_constraint():
    assert format_constraint("upstream") is None
    assert format_constraint("grammar").request_args()["extra_body"]["grammar"].startswith("root ::= block4")
    with pytest.raises(ValueError, match="unknown output format 'regex'"):
        format_constraint("regex")


# -- reading runs back: the funnel table of chapters 2 and 3 ---------------------------------------


def write_run(folder, requests: list[dict], kept: list[dict]) -> None:
    from alpaca_nb.jsonl import append_records

    append_records(folder / "requests.jsonl", requests)
    append_records(folder / "generated.jsonl", kept)


def test_load_run_and_funnel_table_count_what_the_files_hold(tmp_path):
    from alpaca_nb.selfinstruct import funnel_table, load_run

    write_run(tmp_path, [
        {"request": 0, "finish_reason": "length", "completion_tokens": 512, "completion": "...",
         "counters": {"blocks": 6, "malformed": 3, "truncated": 1, "too_short": 1, "near_duplicate": 0, "kept": 1}},
        {"request": 1, "finish_reason": "stop", "completion_tokens": 100, "completion": "...",
         "counters": {"blocks": 2, "malformed": 0, "truncated": 0, "near_duplicate": 1, "kept": 1}},
    ], [{"instruction": "a b c d"}, {"instruction": "e f g h"}])
    report = load_run(tmp_path)
    assert (report.kept, report.requests, report.keep_rate) == (2, 2, 2 / 8)
    column = funnel_table({"run": tmp_path})["run"]
    assert column["malformed (layout broken)"] == 3 and column["failed upstream's filters"] == 1
    assert column["share of completions stopped by the token cap"] == 0.5
    assert column["mean completion tokens"] == 306 and column["well-formed blocks per completion"] == 2.0
    assert isinstance(column["requests"], int) and isinstance(column["kept"], int)  # shown as counts, not 2.00


def test_book_funnels_change_one_thing_at_a_time_and_chapter_3_reads_the_live_run():
    from alpaca_nb.profiles import load_profile
    from alpaca_nb.chapter_runs import book_main_run
    from alpaca_nb.selfinstruct import book_funnels, live_funnel

    laptop = load_profile("laptop")
    as_alpaca, cooler, constrained = book_funnels(laptop)
    assert as_alpaca.sampling == SamplingSettings(max_tokens=laptop.generate_max_tokens) and as_alpaca.constraint is None
    assert cooler.sampling == replace(as_alpaca.sampling, temperature=laptop.compare_temperature)
    assert cooler.constraint is None and laptop.compare_temperature < as_alpaca.sampling.temperature
    assert constrained.sampling == replace(as_alpaca.sampling, temperature=laptop.generate_temperature)
    assert constrained.constraint.kind == "grammar"
    assert book_main_run(laptop).parts[-2:] == ("recipe", "generate")  # the recipe's generate stage
    assert live_funnel(laptop) == constrained and live_funnel(load_profile("cluster")).folder == "upstream-t1"


def test_plot_funnels_labels_every_bar_with_its_count(tmp_path):
    from alpaca_nb.selfinstruct import load_run, plot_funnels

    write_run(tmp_path, [{"request": 0, "finish_reason": "stop", "completion_tokens": 9, "completion": "",
                          "counters": {"blocks": 100, "malformed": 99, "kept": 1}}], [{"instruction": "x"}])
    figure = plot_funnels({"run": load_run(tmp_path)})
    labels = [text.get_text() for text in figure.axes[0].texts]
    assert labels == ["100", "1", "1", "1"] and figure.axes[0].get_yscale() == "log"


def test_ensure_book_generation_reads_an_existing_live_run_without_starting_a_teacher(tmp_path, monkeypatch):
    from alpaca_nb import chapter_runs, selfinstruct
    from alpaca_nb.profiles import load_profile
    from alpaca_nb.reproduce import MANIFEST

    monkeypatch.setenv("ALPACA_NB_CACHE_DIR", str(tmp_path))
    laptop = load_profile("laptop")
    root = tmp_path / "runs" / "laptop" / "self-instruct"
    live = tmp_path / "runs" / "laptop" / "recipe" / "generate"
    for folder in [live, *(root / funnel.folder for funnel in selfinstruct.book_funnels(laptop))]:
        write_run(folder, [{"request": 0, "finish_reason": "stop", "completion_tokens": 1, "completion": "",
                            "counters": {"blocks": 1}}], [])
    monkeypatch.setattr(selfinstruct, "teacher_endpoint", None)  # calling it would fail the test
    monkeypatch.setattr(chapter_runs, "run_book_generation", None)
    (live / MANIFEST).write_text("{}")  # the live run finished (its stage's manifest is written last)
    assert chapter_runs.ensure_book_generation(laptop) == live


def test_ensure_book_generation_reruns_chapter_2_when_a_funnel_is_missing(tmp_path, monkeypatch):
    from alpaca_nb import chapter_runs
    from alpaca_nb.profiles import load_profile

    from alpaca_nb.reproduce import MANIFEST

    monkeypatch.setenv("ALPACA_NB_CACHE_DIR", str(tmp_path))
    laptop = load_profile("laptop")
    write_run(chapter_runs.book_main_run(laptop), [{"request": 0, "finish_reason": "stop", "completion_tokens": 1,
                                                    "completion": "", "counters": {"blocks": 1}}], [])
    (chapter_runs.book_main_run(laptop) / MANIFEST).write_text("{}")
    runs = []
    monkeypatch.setattr(chapter_runs, "run_book_generation",
                        lambda profile: runs.append(profile) or SimpleNamespace(live_run="rerun"))
    assert chapter_runs.ensure_book_generation(laptop) == "rerun" and runs == [laptop]


def test_copy_first_requests_keeps_only_what_the_first_prompts_produced(tmp_path):
    from alpaca_nb.jsonl import append_records
    from alpaca_nb.selfinstruct import copy_first_requests, funnel_table, load_run

    run = tmp_path / "live"
    # Finished out of order, as requests in flight do.
    write_run(run, [
        {"request": 2, "request_id": "c", "finish_reason": "stop", "completion_tokens": 30, "completion": "",
         "counters": {"blocks": 8, "near_duplicate": 1, "kept": 7}},
        {"request": 0, "request_id": "a", "finish_reason": "length", "completion_tokens": 10, "completion": "",
         "counters": {"blocks": 8, "truncated": 1, "kept": 5, "too_short": 2}},
        {"request": 1, "request_id": "b", "finish_reason": "stop", "completion_tokens": 20, "completion": "",
         "counters": {"blocks": 8, "kept": 8}},
    ], [{"instruction": f"task {number}", "request": request}
        for request, count in ((2, 7), (0, 5), (1, 8)) for number in range(count)])
    append_records(run / "ledger.jsonl", [
        {"time": 0.0, "stage": "generate", "model": "m", "api": "completions", "outcome": "ok", "status": 200,
         "error": "", "prompt_tokens": 1, "completion_tokens": 1, "cost_usd": cost, "latency_s": 1.0,
         "request_id": request_id, "attempt": 1} for request_id, cost in (("a", 0.5), ("b", 0.25), ("c", 1.0))])
    out = copy_first_requests(run, tmp_path / "constrained", 2)
    report = load_run(out)
    assert (report.requests, report.kept, report.counters["blocks"], report.counters["truncated"]) == (2, 13, 16, 1)
    assert report.spent_usd == 0.75
    assert funnel_table({"first two": out})["first two"]["mean completion tokens"] == 15
    assert load_run(run).kept == 20  # the source run is left as it was


def test_no_request_starts_once_those_in_flight_are_expected_to_reach_the_target():
    from types import SimpleNamespace

    from alpaca_nb.selfinstruct import GenerationReport, _Limits

    limits = _Limits(target=100, max_requests=None, concurrency=8, max_failures=5)
    run = SimpleNamespace(report=GenerationReport(Path("."), kept=80, requests=20))  # 4 kept per request so far
    assert limits.may_start(run, in_flight=4)  # 80 + 4 x 4 = 96: short of 100
    assert not limits.may_start(run, in_flight=5)  # 80 + 5 x 4 = 100: the requests in flight should suffice
    fresh = SimpleNamespace(report=GenerationReport(Path("."), kept=0, requests=0))
    assert limits.may_start(fresh, in_flight=7) and not limits.may_start(fresh, in_flight=8)  # no yield known yet
    barren = SimpleNamespace(report=GenerationReport(Path("."), kept=0, requests=30))
    assert limits.may_start(barren, in_flight=7)  # nothing kept yet: keep every slot busy


def test_one_teacher_wiring_chooses_the_api_by_where_the_teacher_is(monkeypatch):
    """An API teacher gets chat unless told otherwise and needs its model name; the embedded server (a stand-in
    here: starting it is test_generate's job) gets upstream's completions, announced with its pid."""
    from contextlib import contextmanager

    from alpaca_nb import selfinstruct
    from alpaca_nb.profiles import load_profile

    with selfinstruct.open_teacher("http://api.example/v1", "gpt-4o-mini") as remote:
        assert (remote.base_url, remote.model, remote.api) == ("http://api.example/v1", "gpt-4o-mini", "chat")
    with selfinstruct.open_teacher("http://vllm.example/v1", "llama", api="completions") as vllm:
        assert vllm.api == "completions"
    with pytest.raises(ValueError, match="needs its model name"):
        with selfinstruct.open_teacher("http://api.example/v1", None):
            pass

    @contextmanager
    def fake_server():
        yield SimpleNamespace(base_url="http://127.0.0.1:9/v1", model="local", pid=123)

    monkeypatch.setattr(selfinstruct, "local_server", fake_server)
    lines = []
    with selfinstruct.open_teacher(None, None, announce=lines.append) as local:
        assert (local.base_url, local.model, local.api) == ("http://127.0.0.1:9/v1", "local", "completions")
    assert lines == ["started the embedded llama.cpp server at http://127.0.0.1:9/v1 (pid 123)"]
    with selfinstruct.teacher_endpoint(load_profile("laptop")) as laptop_teacher:
        assert laptop_teacher.api == "completions" and laptop_teacher.model == "local"
    with selfinstruct.teacher_endpoint(load_profile("cluster")) as cluster_teacher:
        assert (cluster_teacher.model, cluster_teacher.api) == ("gpt-4o-mini", "chat")


def test_chapter_2_runs_the_live_run_first_and_the_other_funnels_on_its_first_prompts(tmp_path, monkeypatch):
    """The order and sizes of chapter 2's runs, with generate replaced by a recorder that writes what a run
    would (the real loop is tested against llama-server in test_generate): the live run is the recipe's generate
    stage (finished with its manifest); when it meets its target in one request, its copy, the constrained
    funnel's column, is topped up to the comparison's prompts, and the live run itself is left as finished."""
    from contextlib import contextmanager

    from alpaca_nb.reproduce import MANIFEST, read_manifest

    from alpaca_nb import chapter_runs, selfinstruct
    from alpaca_nb.profiles import load_profile

    monkeypatch.setenv("ALPACA_NB_CACHE_DIR", str(tmp_path))
    profile = replace(load_profile("laptop"), generate_instructions=1, generate_compare_requests=3)
    calls = []

    def recording_generate(endpoint, target, out_dir, *, max_requests, **options):
        done = len(selfinstruct.read_requests(out_dir))
        count = 1 if target == profile.generate_instructions else max_requests - done  # the target met at once
        write_run(Path(out_dir), [{"request": request, "request_id": f"{Path(out_dir).name}-{request}",
                                   "finish_reason": "stop", "completion_tokens": 1, "completion": "",
                                   "counters": {"blocks": 1, "kept": 1}} for request in range(done, done + count)],
                  [{"instruction": f"task {request}", "request": request} for request in range(done, done + count)])
        calls.append((Path(out_dir).name, target, max_requests))
        return selfinstruct.load_run(out_dir)

    teacher = SimpleNamespace(copy=lambda: teacher, model="local")

    @contextmanager
    def started_teacher(chosen):
        yield teacher

    monkeypatch.setattr(selfinstruct, "generate", recording_generate)
    monkeypatch.setattr(selfinstruct, "teacher_endpoint", started_teacher)
    generation = chapter_runs.run_book_generation(profile)
    assert calls[0] == ("generate", 1, profile.generate_max_requests)
    assert sorted(calls[1:]) == [("constrained", 10**9, 3), ("upstream-cooler", 10**9, 3), ("upstream-t1", 10**9, 3)]
    columns = {folder.name: selfinstruct.load_run(folder).requests for folder in generation.funnels.values()}
    assert columns == {"upstream-t1": 3, "upstream-cooler": 3, "constrained": 3}
    assert generation.live_run == chapter_runs.book_main_run(profile) and selfinstruct.load_run(generation.live_run).requests == 1
    assert read_manifest(generation.live_run).stage == "generate" and (generation.live_run / MANIFEST).is_file()
    assert generation.live_seconds >= 0 and generation.compare_seconds >= 0
