"""alpaca_nb.sft, .batching, .export and chapter 4's replies (evaluate) on the real Alpaca records and the embedded SmolLM2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from alpaca_nb.data import AlpacaRecord, DataError, load_alpaca_data
from alpaca_nb.models import load_model, load_tokenizer
from alpaca_nb.batching import (
    PACKED_ATTENTION, AlpacaCollator, enable_packed_attention, length_grouped_batches, padded_tokens,
    padding_by_strategy, padding_free_collator, plot_padding, random_batches,
)
from alpaca_nb.evaluate import (
    Reply, answer_cap, answer_tokens, answers_over, greedy_replies, invents_a_section, replies_table, stop_table,
)
from alpaca_nb.export import (
    axolotl_dataset_block, export_trl_jsonl, from_trl_prompt_completion, import_trl_jsonl, llama_factory_dataset_info,
    to_trl_prompt_completion,
)
from alpaca_nb.sft import (
    IGNORE_INDEX, PROMPT_INPUT, PROMPT_NO_INPUT, build_dataset, ensure_pad_token, export_stanford_json, format_example,
    format_prompt, import_stanford_json, repeats_itself, token_label_rows, tokenize_example,
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run this module's forward passes on one thread: same results, and 3x faster on a shared 2-core machine.

    With two OpenMP threads and the other core busy (CI runs a llama.cpp server beside the tests), every
    parallel region waits for a descheduled thread: this file took 54 s that way and 15 s on one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def records():
    return load_alpaca_data(asset="alpaca_sample")


@pytest.fixture(scope="module")
def examples(records, tokenizer):
    return build_dataset(records, tokenizer, max_length=512)


@pytest.fixture(scope="module")
def eval_model():
    model, _ = load_model()
    return model


def prompt_ids(tokenizer, record) -> list[int]:
    return tokenizer(format_prompt(record.instruction, record.input))["input_ids"]


def with_input(records) -> AlpacaRecord:
    return next(record for record in records if record.input)


# --------------------------------------------------------------------------- templates


def test_templates_are_upstream_prompt_dict_byte_for_byte():
    # stanford_alpaca train.py, PROMPT_DICT["prompt_input"] and ["prompt_no_input"], copied from upstream.
    assert PROMPT_INPUT == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    )
    assert PROMPT_NO_INPUT == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    )


def test_format_prompt_picks_the_template_by_whether_input_is_empty(records, tokenizer):
    record = with_input(records)
    assert format_prompt(record.instruction, record.input) == PROMPT_INPUT.format_map(vars(record))
    assert format_prompt("Say hi.") == PROMPT_NO_INPUT.format_map({"instruction": "Say hi."})
    assert format_example(record, tokenizer.eos_token) == (format_prompt(record.instruction, record.input),
                                                           record.output + "<|im_end|>")


# --------------------------------------------------------------------------- tokenization and labels


def test_labels_mask_every_prompt_token_and_train_output_plus_eos(records, tokenizer):
    for record in (records[0], with_input(records)):
        example = tokenize_example(record.instruction, record.input, record.output, tokenizer)
        prompt = prompt_ids(tokenizer, record)
        assert example["input_ids"][:len(prompt)] == prompt
        assert example["input_ids"][-1] == tokenizer.eos_token_id
        for position, (token, label) in enumerate(zip(example["input_ids"], example["labels"], strict=True)):
            assert label == (IGNORE_INDEX if position < len(prompt) else token), position
        target = [label for label in example["labels"] if label != IGNORE_INDEX]
        assert tokenizer.decode(target) == record.output + tokenizer.eos_token


def test_label_boundary_is_exact_when_bpe_would_merge_prompt_and_output(records, tokenizer):
    # 7 real outputs start with "- ": tokenized with the prompt, ":" and "-" merge into one token, so
    # upstream's prompt-length count would mask the response's first character.
    record = next(r for r in records if r.output.startswith("-"))
    concatenated = tokenizer(format_prompt(record.instruction, record.input) + record.output)["input_ids"]
    prompt = prompt_ids(tokenizer, record)
    assert concatenated[:len(prompt)] != prompt
    example = tokenize_example(record.instruction, record.input, record.output, tokenizer)
    assert example["input_ids"][:len(prompt)] == prompt
    assert tokenizer.decode(example["labels"][len(prompt):]) == record.output + tokenizer.eos_token


def test_train_on_input_labels_every_token(records, tokenizer):
    record = with_input(records)
    example = tokenize_example(record.instruction, record.input, record.output, tokenizer, train_on_input=True)
    assert example["labels"] == example["input_ids"]


def test_a_prompt_that_fills_max_length_is_dropped_not_kept_without_labels(records, tokenizer):
    record = with_input(records)
    prompt_length = len(prompt_ids(tokenizer, record))
    fields = (record.instruction, record.input, record.output, tokenizer)
    assert tokenize_example(*fields, max_length=prompt_length) is None
    one_left = tokenize_example(*fields, max_length=prompt_length + 1)
    assert [label for label in one_left["labels"] if label != IGNORE_INDEX] == [tokenizer.eos_token_id]


def test_truncation_keeps_eos_as_the_last_token(records, tokenizer):
    record = max(records, key=lambda r: len(r.output))
    full = tokenize_example(record.instruction, record.input, record.output, tokenizer)
    cut = tokenize_example(record.instruction, record.input, record.output, tokenizer, max_length=96)
    assert len(full["input_ids"]) > 96 and len(cut["input_ids"]) == 96
    assert cut["input_ids"][-1] == cut["labels"][-1] == tokenizer.eos_token_id
    assert cut["input_ids"][:-1] == full["input_ids"][:95] and cut["labels"][:-1] == full["labels"][:95]


def test_build_dataset_keeps_all_100_real_records_at_512_tokens(examples):
    dataset, report = examples
    assert (report.examples, report.kept, report.dropped_prompt_too_long, report.truncated) == (100, 100, 0, 0)
    assert report.total_tokens == sum(len(e["input_ids"]) for e in dataset) == 11795
    assert report.target_tokens == sum(label != IGNORE_INDEX for e in dataset for label in e["labels"]) == 6613
    assert "kept 100 of 100" in report.summary()


def test_build_dataset_reports_drops_and_truncations_at_96_tokens(records, tokenizer):
    dataset, report = build_dataset(records, tokenizer, max_length=96)
    assert (report.kept, report.dropped_prompt_too_long, report.truncated) == (97, 3, 49)
    assert report.kept + report.dropped_prompt_too_long == report.examples == 100
    for index in report.dropped_indices:
        assert len(prompt_ids(tokenizer, records[index])) >= 96
    for example in dataset:
        assert len(example["input_ids"]) <= 96 and example["input_ids"][-1] == tokenizer.eos_token_id
        assert example["labels"][-1] == tokenizer.eos_token_id
    assert "dropped 3" in report.summary() and "truncated 49" in report.summary()
    assert str(report) == report.summary()


def test_token_label_rows_show_each_token_and_whether_it_is_learned(records, tokenizer):
    record = with_input(records)
    rows = token_label_rows(record, tokenizer)
    example = tokenize_example(record.instruction, record.input, record.output, tokenizer)
    assert [row["token_id"] for row in rows] == example["input_ids"]
    assert [row["label"] for row in rows] == example["labels"]
    assert "".join(row["token"] for row in rows) == format_prompt(record.instruction, record.input) + record.output \
        + tokenizer.eos_token
    assert sum(row["learned"] for row in rows) == len(example["labels"]) - len(prompt_ids(tokenizer, record))
    assert not any(row["learned"] for row in token_label_rows(record, tokenizer, max_length=8))  # dropped: none


# --------------------------------------------------------------------------- pad token


def test_ensure_pad_token_adds_pad_with_mean_initialised_embeddings(tokenizer):
    model, _ = load_model()
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None and tokenizer.pad_token_id is not None
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.get_output_embeddings().weight.detach().clone()
    assert ensure_pad_token(model, no_pad) is True
    assert no_pad.pad_token == "[PAD]" and no_pad.pad_token_id == old_input.shape[0]
    new_input, new_output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_input.shape[0] == new_output.shape[0] == old_input.shape[0] + 1
    assert torch.equal(new_input[:-1], old_input) and torch.equal(new_output[:-1], old_output)
    assert torch.allclose(new_input[-1], old_input.mean(dim=0), atol=1e-7)
    assert torch.allclose(new_output[-1], old_output.mean(dim=0), atol=1e-7)
    assert model.config.pad_token_id == no_pad.pad_token_id


def test_ensure_pad_token_reuses_an_existing_pad_without_resizing(eval_model, tokenizer):
    pad_before, rows_before = tokenizer.pad_token, eval_model.get_input_embeddings().weight.shape[0]
    assert ensure_pad_token(eval_model, tokenizer) is False
    assert tokenizer.pad_token == pad_before == "<|im_end|>"
    assert eval_model.get_input_embeddings().weight.shape[0] == rows_before == len(tokenizer)


# --------------------------------------------------------------------------- batching


def test_alpaca_collator_pads_right_with_pad_id_ignore_index_and_zero_attention(examples, tokenizer):
    features = examples[0][:3]
    lengths = [len(f["input_ids"]) for f in features]
    batch = AlpacaCollator(tokenizer)(features)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    for row, (feature, length) in enumerate(zip(features, lengths)):
        assert batch["input_ids"][row, :length].tolist() == feature["input_ids"]
        assert batch["labels"][row, :length].tolist() == feature["labels"]
        assert batch["attention_mask"][row, :length].tolist() == [1] * length  # the EOS (= pad id) included
        assert set(batch["input_ids"][row, length:].tolist()) <= {tokenizer.pad_token_id}
        assert set(batch["labels"][row, length:].tolist()) <= {IGNORE_INDEX}
        assert set(batch["attention_mask"][row, length:].tolist()) <= {0}
    assert AlpacaCollator(tokenizer, pad_to_multiple_of=64)(features)["input_ids"].shape[1] % 64 == 0


def test_alpaca_collator_refuses_a_tokenizer_without_pad(tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="ensure_pad_token"):
        AlpacaCollator(no_pad)


@pytest.fixture(scope="module")
def short_batch(records, tokenizer, eval_model):
    """Four short real examples (43 to 60 tokens, one with an input), padded and packed, with stock SDPA outputs."""
    chosen = sorted(records, key=lambda r: len(r.instruction + r.input + r.output))[:3] + [with_input(records)]
    features, _ = build_dataset(chosen, tokenizer)
    padded, packed = AlpacaCollator(tokenizer)(features), padding_free_collator()(features)
    with torch.no_grad():
        # use_cache=False: with a cache object transformers skips the packed-sequence mask (ARCHITECTURE.md).
        padded_out, packed_out = eval_model(**padded, use_cache=False), eval_model(**packed, use_cache=False)
    return {"lengths": [len(f["input_ids"]) for f in features], "padded": padded, "packed": packed,
            "padded_out": padded_out, "packed_out": packed_out}


def assert_same_logits_per_example(padded_logits, packed_logits, lengths):
    start = 0
    for row, length in enumerate(lengths):
        difference = (padded_logits[row, :length] - packed_logits[0, start:start + length]).abs().max()
        assert difference < 1e-4, (row, difference.item())
        start += length


def test_padding_free_collator_packs_one_row_with_restarting_positions(short_batch):
    lengths, packed = short_batch["lengths"], short_batch["packed"]
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert all(packed["labels"][0, start] == IGNORE_INDEX for start in starts)  # nothing predicts the next example


def test_padding_free_batch_gives_the_padded_batch_logits_and_loss(short_batch):
    padded_out, packed_out = short_batch["padded_out"], short_batch["packed_out"]
    assert_same_logits_per_example(padded_out.logits, packed_out.logits, short_batch["lengths"])
    assert abs(padded_out.loss.item() - packed_out.loss.item()) < 1e-4


def test_padding_free_with_stock_sdpa_needs_use_cache_false(short_batch, eval_model):
    with torch.no_grad():
        leaking = eval_model(**short_batch["packed"], use_cache=True).logits
    isolated, first = short_batch["packed_out"].logits, short_batch["lengths"][0]
    assert torch.allclose(isolated[0, :first], leaking[0, :first], atol=1e-4)
    assert (isolated[0, first:] - leaking[0, first:]).abs().max() > 1e-2  # later examples see earlier ones


def test_packed_attention_matches_padded_logits_even_with_a_cache(short_batch, eval_model, tokenizer):
    try:
        enable_packed_attention(eval_model)
        assert eval_model.config._attn_implementation == PACKED_ATTENTION
        with torch.no_grad():
            packed_with_cache = eval_model(**short_batch["packed"], use_cache=True)
            padded = eval_model(**short_batch["padded"], use_cache=False)
        prompt = tokenizer(["Hello, how are"], return_tensors="pt")
        generated = eval_model.generate(**prompt, max_new_tokens=3, do_sample=False)
    finally:
        eval_model.set_attn_implementation("sdpa")
    assert_same_logits_per_example(short_batch["padded_out"].logits, packed_with_cache.logits, short_batch["lengths"])
    assert abs(short_batch["padded_out"].loss.item() - packed_with_cache.loss.item()) < 1e-4
    assert torch.equal(padded.logits, short_batch["padded_out"].logits)  # padded batches take the stock SDPA path
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 3)


def test_random_batches_are_upstreams_seeded_shuffle_cut_into_batches():
    batches = random_batches(10, 4, seed=0)
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert sorted(i for batch in batches for i in batch) == list(range(10))
    assert batches == random_batches(10, 4, seed=0) != random_batches(10, 4, seed=1)
    assert padded_tokens([[0, 1], [2]], [3, 5, 7]) == 2 * 5 + 7


def test_length_grouped_batches_cover_every_index_once_and_cut_padding(examples):
    lengths = [len(e["input_ids"]) for e in examples[0]]
    batches = length_grouped_batches(lengths, batch_size=8, seed=0)
    assert sorted(i for batch in batches for i in batch) == list(range(100))
    assert sorted(len(batch) for batch in batches) == [4] + [8] * 12
    assert lengths.index(max(lengths)) in batches[0]  # an out-of-memory error shows at the first step
    real = sum(lengths)
    assert padded_tokens(batches, lengths) - real < 0.5 * (padded_tokens(random_batches(100, 8), lengths) - real)
    assert length_grouped_batches(lengths, 8, seed=0) == batches != length_grouped_batches(lengths, 8, seed=1)


def test_padding_by_strategy_counts_the_same_real_tokens_and_less_padding(examples):
    import matplotlib

    matplotlib.use("Agg")
    lengths = [len(e["input_ids"]) for e in examples[0]]
    table = padding_by_strategy(lengths, batch_size=4)
    upstream, grouped, packed = table.index
    assert set(table["real tokens"]) == {sum(lengths)}
    assert (table["computed tokens"] == table["real tokens"] + table["padding tokens"]).all()
    assert table.loc[packed, "padding tokens"] == 0
    assert table.loc[grouped, "padding tokens"] < table.loc[upstream, "padding tokens"]
    assert plot_padding(table).axes


def test_greedy_replies_in_a_batch_match_one_prompt_at_a_time(records, tokenizer, eval_model):
    from alpaca_nb.models import generate_reply

    batched = greedy_replies(eval_model, tokenizer, records[:3], max_new_tokens=8, batch_size=3)
    for record, reply in zip(records[:3], batched):
        alone = generate_reply(eval_model, tokenizer, format_prompt(record.instruction, record.input),
                               max_new_tokens=8, chat_template=False)
        assert reply.text == alone and reply.new_tokens <= 8
    assert tokenizer.padding_side == "right"  # restored after the left-padded batches


def test_a_reply_cut_by_the_cap_is_not_counted_as_stopped(records, tokenizer, eval_model):
    replies = greedy_replies(eval_model, tokenizer, records[:2], max_new_tokens=1)
    assert [reply.stopped for reply in replies] == [False, False] and {reply.new_tokens for reply in replies} == {1}
    table = stop_table({"cut": replies}, max_new_tokens=1)
    assert table.loc["cut"].to_dict() == {"replies": 2, "ended with EOS": 0, "cut at 1 tokens": 2, "of which looping": 0,
                                          "with an invented ### section": 0, "stop rate": 0.0,
                                          "95 % interval": "0%-66%", "median tokens": 1}
    shown = replies_table(records[:2], {"model": replies}, reference_name="davinci-003")
    assert list(shown.columns) == ["instruction", "input", "davinci-003", "model"]
    assert shown.loc[0, "model"].endswith("[cut at the token cap]")


def test_stop_table_counts_the_replies_that_ended_themselves_and_why_the_others_ran_on():
    loop = " ".join(f"{number}. Social Media: {number + 1}. Email Marketing:" for number in range(1, 9, 2))
    replies = [Reply("a", 3, True), Reply("b\n\n### Explanation:\nwhy", 5, True), Reply(loop, 9, False),
               Reply("a long answer that the cap cut", 9, False), Reply("d", 2, True)]
    row = stop_table({"tuned": replies}, max_new_tokens=9).loc["tuned"]
    assert (row["ended with EOS"], row["cut at 9 tokens"], row["of which looping"], row["stop rate"],
            row["median tokens"], row["with an invented ### section"]) == (3, 2, 1, 0.6, 5, 1)
    # Wilson's interval, as chapter 5's judge agreement: 30 of 32 is known to lie between about 80 % and 98 %.
    assert row["95 % interval"] == "23%-88%"
    thirty_of_32 = [Reply("a", 3, True)] * 30 + [Reply("loop", 9, False)] * 2
    assert stop_table({"tuned": thirty_of_32}, max_new_tokens=9).loc["tuned", "95 % interval"] == "80%-98%"


def test_the_answer_cap_leaves_room_for_the_longest_reference_and_its_eos_and_no_more(tokenizer):
    short, longest = "Paris.", "Sort the list, then take the middle element; with an even count, average the two."
    records = [AlpacaRecord("Name a city.", "", short), AlpacaRecord("Find the median.", "", longest)]
    cap = answer_cap(records, tokenizer)
    assert cap == answer_cap(records[::-1], tokenizer) > answer_cap(records[:1], tokenizer)
    # A reply as long as the longest answer, then EOS, ends within the cap and not within one token less.
    assert answer_tokens(records, tokenizer) == [len(tokenizer(text, add_special_tokens=False)["input_ids"])
                                                 for text in (short, longest)]
    as_long = Reply(longest, answer_tokens(records, tokenizer)[1], True)
    row = stop_table({"model": [as_long]}, cap, within=cap).loc["model"]
    assert row[f"ended within {cap} tokens"] == 1
    assert stop_table({"model": [as_long]}, cap, within=cap - 1).loc["model"][f"ended within {cap - 1} tokens"] == 0
    assert answer_cap([], tokenizer) == 1
    # The answers that would not fit a smaller cap: none at the cap, the longest one a token below it.
    assert (answers_over(records, tokenizer, cap), answers_over(records, tokenizer, cap - 1)) == (0, 1)


def test_stop_table_counts_the_replies_that_ended_within_a_smaller_cap_too():
    replies = [Reply("short", 3, True), Reply("long but ended", 200, True), Reply("loop", 256, False)]
    row = stop_table({"tuned": replies}, max_new_tokens=256, within=128).loc["tuned"]
    assert (row["ended with EOS"], row["ended within 128 tokens"], row["cut at 256 tokens"]) == (2, 1, 1)
    assert "ended within 128 tokens" not in stop_table({"tuned": replies}, max_new_tokens=256).columns


def test_repeats_itself_and_invents_a_section_see_loops_and_headers_not_ordinary_text():
    assert repeats_itself("The font should be easy to read. The font should be easy to read. The font should be")
    assert not repeats_itself("Bubble sort compares neighbours and swaps them until the list is sorted.")
    assert invents_a_section("An answer.\n\n### Response:\nAnother") and not invents_a_section("Use # for headers")


# --------------------------------------------------------------------------- exporters


def test_stanford_json_to_trl_and_back_is_exact(records):
    demo = load_alpaca_data(asset="alpaca_gpt4_demo")
    for source in (records, demo):
        rows = to_trl_prompt_completion(source)
        assert set(rows[0]) == {"prompt", "completion"}
        assert from_trl_prompt_completion(rows) == source
    record = with_input(records)
    assert to_trl_prompt_completion([record]) == [{"prompt": format_prompt(record.instruction, record.input),
                                                   "completion": record.output}]


def test_trl_jsonl_export_import_is_exact(records, tmp_path):
    path = export_trl_jsonl(records, tmp_path / "train.jsonl")
    assert len(path.read_text(encoding="utf-8").splitlines()) == 100
    assert import_trl_jsonl(path) == records


def test_trl_jsonl_round_trips_text_with_line_separators(tmp_path):
    records = [AlpacaRecord("Split\u2028this.", "", "one\u2029two\u0085three"), AlpacaRecord("Plain.", "", "ok")]
    path = export_trl_jsonl(records, tmp_path / "trl.jsonl")
    assert import_trl_jsonl(path) == records


def test_from_trl_names_the_row_that_is_not_an_alpaca_prompt():
    with pytest.raises(DataError, match="row 1, field 'prompt'"):
        from_trl_prompt_completion([{"prompt": format_prompt("Say hi."), "completion": "hi"},
                                    {"prompt": "Say hi.", "completion": "hi"}])


def test_import_trl_jsonl_names_the_file_line_and_field_of_a_bad_row(tmp_path):
    good = json.dumps({"prompt": format_prompt("Say hi."), "completion": "hi"})
    cases = {
        json.dumps({"prompt": "Say hi.", "completion": "hi"}): "line 3, field 'prompt': not an Alpaca prompt",
        json.dumps({"prompt": format_prompt("Say hi.")}): "line 3, field 'completion': missing or not a string",
        "{not json": "line 3: invalid JSON",
    }
    for bad, message in cases.items():
        path = tmp_path / "train.jsonl"
        path.write_text(f"{good}\n\n{bad}\n", encoding="utf-8")  # a blank line 2 is skipped, not an error
        with pytest.raises(DataError, match=f"train.jsonl, {message}"):
            import_trl_jsonl(path)


def test_stanford_json_export_import_is_exact(records, tmp_path):
    path = export_stanford_json(records, tmp_path / "out" / "alpaca.json")
    assert json.loads(path.read_text(encoding="utf-8"))[0] == {
        "instruction": records[0].instruction, "input": records[0].input, "output": records[0].output}
    assert import_stanford_json(path) == records


def test_import_stanford_json_names_the_bad_record(tmp_path):
    path = tmp_path / "bad.json"
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi"}, {"instruction": "x", "input": ""}]
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"record 1, field 'output': missing"):
        import_stanford_json(path)


def test_llama_factory_entry_maps_alpaca_columns():
    entry = llama_factory_dataset_info("alpaca_nb", "alpaca_nb.json")
    assert entry == {"alpaca_nb": {"file_name": "alpaca_nb.json", "formatting": "alpaca",
                                   "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}
    json.dumps(entry)  # ready to merge into dataset_info.json


def test_axolotl_block_is_a_yaml_ready_alpaca_dataset(tmp_path):
    block = axolotl_dataset_block(tmp_path / "alpaca.json")
    assert block["path"] == str(tmp_path / "alpaca.json") and block["type"] == "alpaca"
    assert all(isinstance(value, str) for value in block.values())
    assert yaml.safe_load(yaml.safe_dump({"datasets": [block]})) == {"datasets": [block]}


@pytest.mark.parametrize("trainer", ["stanford", "trl", "llama-factory", "axolotl"])
def test_cli_export_writes_each_trainers_files_and_the_records_read_back(trainer, records, tmp_path, capsys):
    from alpaca_nb.cli import build_parser, main
    from alpaca_nb.export import EXPORT_FORMATS

    source = export_stanford_json(records[:5], tmp_path / "mine.json")
    assert main(["export", str(source), "--to", trainer, "--out", str(tmp_path / "out")]) == 0
    written = [Path(line.removeprefix("wrote ")) for line in capsys.readouterr().out.splitlines()]
    assert all(path.is_file() for path in written)
    if trainer == "trl":
        assert import_trl_jsonl(written[0]) == list(records[:5])
    else:
        assert import_stanford_json(written[0]) == list(records[:5])
    if trainer == "llama-factory":
        assert json.loads(written[1].read_text())["alpaca_nb"]["file_name"] == written[0].name
    if trainer == "axolotl":
        block = yaml.safe_load(written[1].read_text())["datasets"][0]
        assert Path(block["path"]) == written[0].resolve() and block["type"] == "alpaca"
    choices = next(action.choices for action in build_parser()._subparsers._group_actions[0].choices["export"]._actions
                   if action.dest == "to")
    assert tuple(choices) == EXPORT_FORMATS


def test_mix_records_takes_every_generated_record_first_then_tops_up_with_real_ones():
    from alpaca_nb.data import AlpacaRecord
    from alpaca_nb.sft import mix_records

    generated = [AlpacaRecord(f"generated {index}", "", "out") for index in range(3)]
    real = [AlpacaRecord(f"real {index}", "", "out") for index in range(5)]
    mix = mix_records(generated, real, size=6, real_source="alpaca_sample")
    assert [record.instruction for record in mix.records] == ["generated 0", "generated 1", "generated 2",
                                                              "real 0", "real 1", "real 2"]
    assert (mix.generated, mix.real) == (3, 3)
    assert mix.summary() == "6 records: 3 generated by our self-instruct run, 3 real ones from alpaca_sample"
    assert mix_records(generated, real, size=2, real_source="x").real == 0
    with_empty = mix_records([*generated, AlpacaRecord("generated 3", "an input", " ")], real, 6, "alpaca_sample")
    assert with_empty.records == mix.records and with_empty.empty_outputs == 1
    assert "(1 with an empty output left out)" in with_empty.summary()
    loop = "Buy now and save. Buy now and save. Buy now and save. Buy now and save."
    with_loop = mix_records([*generated, AlpacaRecord("generated 3", "", loop), AlpacaRecord("generated 4", "", "")],
                            real, 6, "alpaca_sample")
    assert with_loop.records == mix.records and (with_loop.empty_outputs, with_loop.looping_outputs) == (1, 1)
    assert "(1 with an empty output and 1 with a looping output left out)" in with_loop.summary()
